"""Crash-safe checkpoints inside a run folder.

Layout: ``RUN/checkpoints/step-NNNNNNN/{model.safetensors, state.pt}`` plus ``RUN/checkpoints/latest``, a small
JSON pointer. A new checkpoint is written completely (every file fsynced) into its own folder before the pointer is
atomically replaced, and the previous checkpoint is deleted only after that, so a crash at any moment leaves the
pointer naming a complete, loadable checkpoint.

Weights are safetensors (loading executes nothing); the training state (optimizer, RNG, data position) is a torch file
read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .model import Transformer

POINTER = "latest"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, model: Transformer, state: dict[str, Any], step: int,
                    model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights and training state for `step`, then point `latest` at them and drop the previous checkpoint.
    `model_state` replaces `model.state_dict()`, e.g. with the full weights gathered from the shards of FSDP2."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(run_dir)
    final = root / f"step-{step:07d}"
    if previous == final:  # this step is already saved (e.g. Ctrl-C right after an eval checkpoint)
        return final
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights_of(model, model_state), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync_file(f)
    if final.exists():  # left over from a crash before the pointer moved: not the valid checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / POINTER, json.dumps({"step": step, "dir": final.name}))
    if previous is not None and previous != final:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def weights_of(model: Transformer, model_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict as saved: a tied LM head is stored once, under tok_emb.weight."""
    state = model.state_dict() if model_state is None else model_state
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` points at, or None when the run has no checkpoint yet."""
    pointer = Path(run_dir) / "checkpoints" / POINTER
    if not pointer.exists():
        return None
    try:
        folder = pointer.parent / json.loads(pointer.read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint pointer {pointer} is corrupt ({e}); delete the run or restore it") from e
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} named by {pointer} is missing; the run folder was altered")
    return folder


def load_weights(model: Transformer, folder: Path) -> None:
    """Load model.safetensors into `model`, checking every tensor's name and shape against the config's."""
    path = Path(folder) / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"missing weights file {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"weights file {path} is truncated or corrupt ({e})") from e
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not fit the model config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; load it with the config saved beside it")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"weights in {path} do not fit the model config: {k} has shape "
                                  f"{tuple(v.shape)}, config needs {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False, assign=model.tok_emb.weight.is_meta)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def load_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "state.pt"
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as e:
        raise CheckpointError(f"missing training state {path}") from e
    except Exception as e:  # torch raises a variety of types for a truncated or foreign file
        raise CheckpointError(f"training state {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
