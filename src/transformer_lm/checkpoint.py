"""Crash-safe checkpoints inside a run folder.

Layout: ``RUN/checkpoints/step-NNNNNNN/{model.safetensors, state.pt}`` plus ``RUN/checkpoints/latest``, a small
JSON pointer. A new checkpoint is written completely (every file fsynced) into its own folder before the pointer is
atomically replaced, and the previous checkpoint is deleted only after that, so a crash at any moment leaves the
pointer naming a complete, loadable checkpoint.

Weights are safetensors (loading executes nothing); the training state (optimizer, RNG, data position) is a torch file
read back with ``weights_only=True``. A sharded checkpoint (FSDP2 runs) holds ``shards/`` instead of
``model.safetensors``: each rank's part of the weights and optimizer state, written by torch.distributed.checkpoint;
its ``state.pt`` has the rest of the training state. `tlm consolidate` adds the single-file weights to it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, RunExistsError
from .lora import merged_state_dict

POINTER = "latest"
SHARDS = "shards"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with the mode open() gives a new file (0666 less the umask): save_file makes it
    0600, so others on a shared file system could not load a run their group may read. A failed write (a full
    disk) is raised as the OSError it is, which the CLI reports in one line: safetensors raises its own
    SafetensorError, and `tlm train` ended in its traceback."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    share(path)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, with a failed write (a full disk) raised as the OSError it is, naming the file: torch's zip
    writer reports it as a RuntimeError ('unexpected pos 576 vs 534'), from which a Python file object's write
    keeps the OSError as the context (a path given to torch.save keeps nothing)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except (RuntimeError, OSError) as e:
        err = e if isinstance(e, OSError) else e.__context__
        if not isinstance(err, OSError) or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None


def share(path: str | Path) -> None:
    """Give a file made private (0600, by save_file or mkstemp) the mode open() would have given it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers see the old or the new file, never half.
    UTF-8 whatever the locale (a report's text is not all ASCII). A failed write (a full disk) removes the temp file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run tlm wrote (trained or imported): a config.json with our `model` section. A
    config.json alone is no sign of one: every Hugging Face model folder has one."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("model"), dict)


def check_out(out: Path, overwrite: bool, inputs: Iterable[str | Path] = (), resumable: bool = False,
              ours: Callable[[Path], bool] = is_run_folder, what: str = "a run") -> None:
    """Raise RunExistsError unless `out` (a run, import, export or prepared-data folder about to be written) may be
    written: it is missing or empty, or `overwrite` is given and it holds something tlm wrote (`ours(out)`), is not
    the working directory or above it, and holds none of `inputs` (the data or model the command reads), so that a
    mistyped --out never deletes anything else. Nothing is deleted here: the command does it once the new output is
    ready (clear_out, staged_dir, or prepare's rename)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    is_ours = ours(out)
    noun = what.split(" ", 1)[1] if what.startswith(("a ", "an ")) else what  # "no run", "no export"
    if not overwrite:
        if not is_ours:
            raise RunExistsError(f"{out} is not empty and holds no {noun}; choose another --out")
        raise RunExistsError(f"{out} already holds {what}; pass {'--resume true to continue it, ' if resumable else ''}"
                             "--overwrite true to replace it, or choose another --out")
    where, cwd = out.resolve(), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise RunExistsError(f"--overwrite would delete {out}, which holds the working directory; choose another --out")
    for p in inputs:
        if where == Path(p).resolve() or where in Path(p).resolve().parents:
            raise RunExistsError(f"--overwrite would delete {p}, which this command reads; choose another --out")
    if not is_ours:
        raise RunExistsError(f"{out} holds files but no {noun} tlm wrote, and --overwrite replaces "
                             "only such a folder; empty it yourself or choose another --out")


def clear_out(out: Path) -> None:
    """Empty (or create) `out`, once check_out has allowed it."""
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def replace_dir(new: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished folder `new` to `out_dir`; a previous `out_dir` is deleted only after the move, and only with
    `overwrite`: without it, a folder that was filled meanwhile (by another prepare of the same cache entry, or by
    hand) is kept, and RunExistsError raised, where it was deleted."""
    if not overwrite:
        try:
            out_dir.rmdir()  # an empty folder check_out allowed; OSError once something is in it
        except FileNotFoundError:
            pass
        except OSError:
            raise RunExistsError(f"{out_dir} was filled while this output was being written; choose another --out, "
                                 "or pass --overwrite true to replace it") from None
        os.replace(new, out_dir)
        return
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    old = new.with_name(new.name + ".old")
    os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A new hidden folder beside `out` to write an import or export into, moved to `out` when the block ends, so
    that a failure part-way (a full disk, Ctrl-C) leaves what `out` held before (check_out has allowed replacing
    it) instead of an emptied or half-written folder; the staging folder is removed on failure. A symlinked `out`
    has its target replaced, not the link."""
    where = out.resolve()
    if where.exists() and not where.is_dir():  # the move would replace the file
        raise RunExistsError(f"{out} is a file, not a folder; choose another --out")
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = where.with_name(f".{where.name}.{secrets.token_hex(4)}.tmp")  # hidden; mkdir honours the umask
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, where, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any], step: int) -> Path:
    """Write whole weights (safetensors) and training state for `step`, then point `latest` at them and drop the
    previous checkpoint."""
    tmp = begin_checkpoint(run_dir, step)
    if tmp is None:  # this step is already saved (e.g. Ctrl-C right after an eval checkpoint)
        return Path(run_dir) / "checkpoints" / _step_dir(step)
    try:
        save_tensors(weights_of(model), tmp / "model.safetensors", metadata={"step": str(step)})
        return commit_checkpoint(run_dir, tmp, step, state)
    except BaseException:  # a full disk: give back the space the partial checkpoint holds; the previous one stands
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _step_dir(step: int) -> str:
    return f"step-{step:07d}"


def begin_checkpoint(run_dir: Path, step: int) -> Path | None:
    """An empty temporary folder to write `step`'s checkpoint into, or None when `latest` already names that step.
    Nothing reads the temporary folder: until `commit_checkpoint` the previous checkpoint stays the valid one."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    if latest_checkpoint(run_dir) == root / _step_dir(step):
        return None
    tmp = root / f".{_step_dir(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash mid-save
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: Path, tmp: Path, step: int, state: dict[str, Any]) -> Path:
    """Write the training state beside what `tmp` holds, fsync everything, rename the folder to its step and move
    the `latest` pointer to it atomically; then delete every other checkpoint folder: the previous one, and any a
    crash left (between the pointer's move and the deletion, or mid-save), which would otherwise stay for good."""
    root = Path(run_dir) / "checkpoints"
    final = root / _step_dir(step)
    save_torch(state, tmp / "state.pt")
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    for d in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
        fsync_dir(d)
    if final.exists():  # left over from a crash before the pointer moved: not the valid checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / POINTER, json.dumps({"step": step, "dir": final.name}))
    for d in root.iterdir():
        if d != final and d.is_dir() and re.fullmatch(r"\.?step-\d+(\.tmp)?", d.name):
            shutil.rmtree(d, ignore_errors=True)
    return final


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as saved: a tied LM head is stored once, under tok_emb.weight; LoRA's adapters merged into
    the weights they adapt (lora.merged_state_dict)."""
    tensors = {k: v.detach().contiguous() for k, v in merged_state_dict(model).items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def write_weights(folder: Path, model: nn.Module, step: int) -> Path:
    """Write `model`'s weights as folder/model.safetensors, atomically (temp file, fsync, rename). A failed write
    removes the temp file: a full disk kept it, hidden, as large as the weights written so far."""
    path = Path(folder) / "model.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_tensors(weights_of(model), tmp, metadata={"step": str(step)})
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


# Sharded checkpoints (FSDP2): every rank writes its own shards with torch.distributed.checkpoint (DCP) into
# step-N/shards/ (a .metadata index + one .distcp file per rank), inside the same temporary step folder that
# `commit_checkpoint` renames, so a crash mid-save leaves the previous checkpoint in force. Keys are parameter names
# (not positions or ranks), and DCP reads any saved shard into any requested one: a run resumes at another world
# size, and one process without a process group reads the whole tensors.


def is_sharded(folder: Path) -> bool:
    """Whether the checkpoint is FSDP2's sharded kind: by its shards folder, so that one whose .metadata was lost
    (a copy by `cp shards/*` skips the dotfile) is reported as that, not as a checkpoint missing model.safetensors."""
    return (Path(folder) / SHARDS).is_dir()


def _shard_metadata(path: Path) -> Any:
    """DCP's metadata of the shards in `path`, read first: dcp.load logs tracebacks of its own on a bad one."""
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"sharded checkpoint {path} is unreadable: its .metadata is missing or corrupt "
                              f"({_first_line(e)}); resume from an intact copy of the run folder") from e


def save_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shards of the model and optimizer state into folder/shards. A collective under a process
    group: every rank calls it with the same folder (on a file system they share)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=Path(folder) / SHARDS)


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the model and optimizer state of a sharded checkpoint into `model` and `optimizer` as they are now laid
    out (FSDP2 at any world size, DDP, or one process): each rank reads the pieces of the saved shards it holds. A
    collective under a process group."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CheckpointError(f"{folder} is a sharded (FSDP2) checkpoint of AdamW state; resume it with "
                              "--train.optimizer adamw")
    model_state, optim_state = get_state_dict(model, optimizer)  # the tensors DCP fills in place
    state = {"model": model_state, "optim": optim_state}
    path = Path(folder) / SHARDS
    _shard_metadata(path)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path)
    except (Exception, dcp.CheckpointException) as e:  # DCP's own type derives from BaseException
        raise CheckpointError(f"sharded checkpoint {path} is incomplete or corrupt ({_first_line(e)})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _read_shard_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole model tensors of a sharded checkpoint, read in this process alone (no process group needed)."""
    reader = dcp.FileSystemReader(path)
    saved = _shard_metadata(path).state_dict_metadata
    shapes = {k.removeprefix("model."): m.size for k, m in saved.items()
              if k.startswith("model.") and isinstance(m, dcp.TensorStorageMetadata)}
    if "lm_head.weight" not in expected:  # a tied head is saved under both of its names
        shapes.pop("lm_head.weight", None)
    _check_fits(path, shapes, expected)
    tensors = {k: torch.empty(shapes[k], dtype=saved[f"model.{k}"].properties.dtype) for k in expected}
    try:
        with _single_process_quiet():
            dcp.load({"model": tensors}, storage_reader=reader, no_dist=True)
    except (Exception, dcp.CheckpointException) as e:
        raise CheckpointError(f"sharded checkpoint {path} is incomplete or corrupt ({_first_line(e)})") from e
    return tensors


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call made without a process group; reading or writing in one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(process group|single process|uninitialized).*")
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` points at, or None when the run has no checkpoint yet. The pointer may only name this
    run's own step-NNNNNNN folder of its step: anything else (a path out of the run, whose old checkpoint the next
    save would delete) is a corrupt pointer."""
    pointer = Path(run_dir) / "checkpoints" / POINTER
    if not pointer.exists():
        return None
    try:
        saved = json.loads(pointer.read_text())
        step, name = saved["step"], saved["dir"]
        if type(step) is not int or name != _step_dir(step):
            raise ValueError(f"it names {name!r} for step {step!r}, not this run's step-NNNNNNN folder")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint pointer {pointer} is corrupt ({e}); delete the run or restore it") from e
    folder = pointer.parent / name
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} named by {pointer} is missing; the run folder was altered")
    return folder


def checkpoint_step(folder: Path) -> int:
    """The step of a checkpoint folder returned by latest_checkpoint (its name says it)."""
    return int(folder.name.removeprefix("step-"))


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load a checkpoint's whole weights into `model` (on the meta device too), checking every tensor's name and
    shape against the config's: model.safetensors, or else the shards of a sharded checkpoint, read in memory."""
    path = Path(folder) / "model.safetensors"
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
    if not path.exists() and is_sharded(folder):
        tensors = _read_shard_weights(Path(folder) / SHARDS, expected)
    else:
        if not path.exists():
            raise CheckpointError(f"missing weights file {path}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"weights file {path} is truncated or corrupt ({e})") from e
        _check_fits(path, {k: v.shape for k, v in tensors.items()}, expected)
    model.load_state_dict(tensors, strict=False, assign=model.tok_emb.weight.is_meta)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def _check_fits(path: Path, shapes: dict[str, torch.Size], expected: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not fit the model config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; load it with the config saved beside it")
    for k, shape in shapes.items():
        if tuple(shape) != tuple(expected[k].shape):
            raise CheckpointError(f"weights in {path} do not fit the model config: {k} has shape "
                                  f"{tuple(shape)}, config needs {tuple(expected[k].shape)}")


def load_state(folder: Path) -> dict[str, Any]:
    """The training state, read with weights_only=True: a file that names Python objects to rebuild (which would run
    their code) is refused with one short line. torch's own text, which the CLI printed whole, is a page long and
    advises weights_only=False or add_safe_globals, neither of which tlm should take."""
    path = Path(folder) / "state.pt"
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as e:
        raise CheckpointError(f"missing training state {path}") from e
    except pickle.UnpicklingError as e:
        name = re.search(r"GLOBAL ([\w.]+)", str(e))
        if name:
            raise CheckpointError(f"training state {path} names the Python object {name.group(1)}, which only running "
                                  "code from the file could rebuild: not a state tlm wrote, and it will not be loaded; "
                                  "resume from an intact copy of the run folder") from e
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise CheckpointError(f"training state {path} is truncated or corrupt "
                              f"({why.group(1).strip() if why else _first_line(e)})") from e
    except Exception as e:  # torch raises a variety of types for a truncated or foreign file
        first = re.split(r"(?<=\.)\s", _first_line(e), maxsplit=1)[0]  # torch's next sentences are advice
        raise CheckpointError(f"training state {path} is truncated or corrupt ({first})") from e
