"""Corpus → token files + manifest.

`prepare` streams text files through a tokenizer in worker processes into nanoGPT's format: two flat arrays of
raw token ids, `train.bin` and `val.bin` (read back with `np.memmap`), beside `tokenizer.json` and a
`manifest.json` with the counts (chat_data.py writes fine-tuning examples in the same format, with a mask per split
of the tokens to learn and where each example starts), which `load_prepared` reads back, checked. windows.py draws
the training windows and evaluation batches from them.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import multiprocessing as mp
import os
import re
import secrets
import shutil
import sysconfig
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .chat import read_chat_template
from .checkpoint import check_out, replace_dir
from .errors import ConfigError, DataError, TLMError
from .tokenizers import Tokenizer, load_tokenizer, save_tokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20  # characters per tokenization task (~1 MiB of ASCII); tests shrink it to stress the cuts
MANIFEST_FORMAT = 1
_SNIFF_BYTES = 8192
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
# Preferred chunk ends; see _cut_point. Python's \s also matches \x1c-\x1f, which GPT-2's regex does not count as
# whitespace (it joins them with punctuation before them), so a cut must not fall before those.
_CUTS = (re.compile(r"(?<=\S)(?=\r?\n)"), re.compile(r"(?<=\S)(?=[^\S\x1c-\x1f])"))
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# What `prepare` and `tlm train` write into every folder of theirs: all of a set mark one (few corpora hold all three)
_OUTPUT_MARKERS = (("manifest.json", "train.bin", "tokenizer.json"), ("config.json", "env.json", "tokenizer.json"))

Piece = tuple[str, str, bool, bool]  # (split, text, continues the text before it, append end-of-text after it)


def _open_text(path: Path):
    """Text mode as every pass reads it: UTF-8, damaged bytes → U+FFFD, line endings kept (so bytes add up)."""
    return open(path, encoding="utf-8", errors="replace", newline="")


def _is_text(path: Path) -> bool:
    """A non-empty file without a NUL byte in its first 8 KiB (git's test for binary). Text that is not valid UTF-8
    (say, Windows-1252 quotes in a Gutenberg book) is kept, with a warning once it is read (`count_chars`); its
    undecodable bytes read as U+FFFD."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        return b"\0" not in f.read(_SNIFF_BYTES)


def _kept(path: Path, binary: Sequence[str]) -> bool:
    """A non-empty text file (`_is_text`), or a non-empty file whose suffix is in `binary` (Parquet examples)."""
    return _is_text(path) or (path.suffix in binary and path.is_file() and path.stat().st_size > 0)


def _is_output(folder: Path) -> bool:
    """A folder `prepare` or `tlm train` wrote: its JSON files are not corpus text, and a run's change as it trains
    (a corpus folder holding its own prepared data or runs would otherwise be read with them, differently each time)."""
    return any(all((folder / name).is_file() for name in names) for names in _OUTPUT_MARKERS)


def _walk(root: Path, skip: set[str] = frozenset()) -> list[Path]:
    """Files under `root`, sorted, without hidden names, folders named in `skip` or folders tlm wrote (`_is_output`);
    symlinked folders not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip]
        outputs = [d for d in dirnames if _is_output(Path(dirpath, d))]
        if outputs:
            log.warning("%s: skipped %s, written by tlm (prepared data or a run), not text to train on", dirpath,
                        ", ".join(sorted(outputs)))
            dirnames[:] = [d for d in dirnames if d not in outputs]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found)


def resolve_sources(source: str | os.PathLike | Sequence[str | os.PathLike],
                    binary: Sequence[str] = ()) -> list[Path]:
    """The text files named by `source`: a file, a folder, a glob pattern (`**` recurses), or a list of those.

    Folders are walked recursively in sorted order, skipping hidden names and the prepared data and runs tlm wrote
    there (`_is_output`); folders and glob matches keep only
    non-empty text files (no NUL byte in the first 8 KiB, see `_is_text`), and non-empty files whose suffix is in
    `binary` (Parquet: chat_data's examples). A file named directly must be non-empty text; anything that resolves
    to no files raises DataError.
    """
    if not isinstance(source, (str, os.PathLike)):
        named = [f for s in source for f in resolve_sources(s, binary)]
        if not named:
            raise DataError("no data sources were given; pass a text file, a folder or a glob pattern")
        files = list({f.resolve(): f for f in reversed(named)}.values())[::-1]  # each file once, where first named
        if len(files) < len(named):  # read twice, a file would sit in train and, at the end, in val too
            log.warning("%d of the files named are named more than once (say, a folder and a file in it); each is "
                        "read once", len(named) - len(files))
        return files
    path = Path(source)
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty; pass a file with text in it")
        if not _kept(path, binary):
            raise DataError(f"data file {path} looks binary (a NUL byte in its first 8 KiB, as UTF-16 text has); pass "
                            "UTF-8 text (convert UTF-16, as Windows PowerShell writes, with iconv -f UTF-16 -t UTF-8)")
        return [path]
    if path.is_dir():
        found, what = _walk(path), f"folder {path}"
    elif any(c in str(source) for c in "*?["):
        found = [Path(p) for p in sorted(glob.glob(str(source), recursive=True))]
        if not found:
            raise DataError(f"glob pattern {str(source)!r} matches no files; fix the pattern (quote it in the shell)")
        what = f"glob pattern {str(source)!r}"
    elif path.exists():  # a pipe (`<(zcat corpus.gz)`) or a device: prepare reads its sources more than once
        raise DataError(f"data path {path} is not a regular file (a pipe or a device), which prepare cannot read "
                        "twice; save the text to a file first")
    else:
        raise DataError(f"data path {path} does not exist; pass an existing text file, folder or glob pattern")
    files = [f for f in found if _kept(f, binary)]
    if not files:
        raise DataError(f"{what} has no non-empty text files; add some or point to other data")
    skipped = [f for f in found if f.is_file() and f not in files]
    if skipped:
        log.warning("%s: skipped %d empty or binary file(s) (a NUL byte in the first 8 KiB, as UTF-16 text has): %s",
                    what, len(skipped), ", ".join(f.name for f in skipped[:3]) + (", ..." if len(skipped) > 3 else ""))
    return files


def default_corpus() -> list[Path]:
    """The built-in corpus: the running Python's standard library, on every machine with no download.

    Every non-empty `.py` file under `sysconfig.get_paths()["stdlib"]`, sorted, except inside folders named
    site-packages/dist-packages (third-party code), test/tests/idlelib/lib2to3 (test suites and fixtures, some
    deliberately malformed) and __pycache__, and hidden ones. Its size depends on the Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in _walk(root, _STDLIB_SKIP) if p.suffix == ".py" and p.stat().st_size > 0]
    if not files:
        raise DataError(f"found no standard-library .py files under {root}; pass your own data files instead")
    return files


def _cut_point(buf: str) -> int:
    """Where to end a tokenization chunk: before the last line break that follows a non-space character in the
    second half of `buf`, else before any whitespace that follows one, else at the end (no cut). Byte and char ids never
    depend on the cut; GPT-2-style pre-tokenization never joins a non-space character with the whitespace after
    it, and splits a whitespace run by looking only at the run and the next character, so BPE ids don't either."""
    for pattern in _CUTS:
        last = deque(pattern.finditer(buf, len(buf) // 2), maxlen=1)
        if last:
            return last[0].start()
    return len(buf)


MAX_CHUNK_CHARS = 16 * CHUNK_CHARS
"""A text with no whitespace this long (a base64 blob; give or take a CHUNK_CHARS) is cut anyway, with a warning:
ids near the cut may then differ from those of the whole text."""


def _file_chunks(path: Path) -> Iterator[str]:
    """The text of `path` in pieces of about CHUNK_CHARS to 2 * CHUNK_CHARS characters, cut at `_cut_point`; where
    the second half of a piece has no whitespace to cut before, the piece grows until it has (up to MAX_CHUNK_CHARS)."""
    with _open_text(path) as f:
        carry, block = "", f.read(CHUNK_CHARS)
        while block:
            ahead = f.read(CHUNK_CHARS)
            buf = carry + block
            cut = _cut_point(buf) if ahead else len(buf)
            if cut == len(buf) and ahead and len(buf) < MAX_CHUNK_CHARS:
                carry, block = buf, ahead  # a cut here would split a word (changing BPE ids): read on
                continue
            if ahead and cut == len(buf):
                log.warning("%s has no whitespace in %d characters: cut there (token ids at the cut may differ from "
                            "those of the whole text)", path, len(buf))
            yield buf[:cut]
            carry, block = buf[cut:], ahead


def read_sources(paths: Sequence[Path]) -> Iterator[str]:
    """The text of `paths` as `prepare` reads it, in pieces of about CHUNK_CHARS characters cut before line breaks
    (`_cut_point`); joined, they are the files' text back to back. Feeds tokenizer training in bounded memory."""
    for path in paths:
        yield from _file_chunks(Path(path))


def _pieces(sources: Sequence[Path], split_at: int, separate: bool) -> Iterator[Piece]:
    """The corpus stream in order as Pieces; the piece that holds character `split_at` is cut there, and each file's
    separator goes with that file's last piece. A file's later chunks continue its text (Tokenizer.
    encode_continuation); a file, and the validation split, start afresh."""
    start = 0  # stream offset, in characters, of the next piece
    for i, path in enumerate(sources):
        chunks = _file_chunks(path)
        prev, continues = next(chunks, None), False
        while prev is not None:
            nxt = next(chunks, None)
            eot = separate and nxt is None and i < len(sources) - 1
            end = start + len(prev)
            if start < split_at < end:
                yield "train", prev[: split_at - start], continues, False
                yield "val", prev[split_at - start :], False, eot
            else:
                yield ("train" if end <= split_at else "val"), prev, continues and start != split_at, eot
            start, prev, continues = end, nxt, True


class _Encoder:
    """Turns a piece into (split, ids, UTF-8 bytes of its text); runs in this process or once per worker."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype):
        self.tokenizer, self.dtype = tokenizer, dtype

    def __call__(self, piece: Piece) -> tuple[str, np.ndarray, int]:
        split, text, continues, eot = piece
        ids = (self.tokenizer.encode_continuation if continues else self.tokenizer.encode)(text) if text else []
        if eot:
            ids = [*ids, self.tokenizer.eot_id]
        return split, np.array(ids, dtype=self.dtype), len(text.encode("utf-8"))


_worker_encoder: _Encoder | None = None


def _init_worker(tokenizer: dict[str, Any], dtype: np.dtype) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(tokenizer_from_dict(tokenizer), dtype)


def _encode_in_worker(piece: Piece) -> tuple[str, np.ndarray, int]:
    assert _worker_encoder is not None, "the pool initializer did not run"
    return _worker_encoder(piece)


def _encoded(pieces: Iterator[Piece], tokenizer: Tokenizer, dtype: np.dtype, workers: int):
    """Encoded pieces in order. A window of 2 * workers tasks in flight bounds memory (Executor.map would not: it
    submits the whole input first). Workers start from a fresh interpreter (forkserver/spawn), which avoids fork's
    hazards with the threads of torch and of Hugging Face tokenizers. A worker that dies (one that could not start,
    as in a script without the `__main__` guard, which multiprocessing.Pool replaced forever: a hang) ends the run
    with one DataError."""
    if workers == 1:
        yield from map(_Encoder(tokenizer, dtype), pieces)
        return
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", __name__])  # import torch once per program, not once per worker
    else:
        ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, _init_worker, (tokenizer.to_dict(), dtype)) as pool:
        pending: deque = deque()
        try:
            for piece in pieces:
                pending.append(pool.submit(_encode_in_worker, piece))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise DataError("the tokenizing worker processes died (in a script, call prepare or training_data under "
                            "`if __name__ == \"__main__\":`, as multiprocessing needs); or pass workers=1") from None


def _rebuilds(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer_from_dict` (how each worker gets the tokenizer) gives back one of the same class: a subclass
    of a kind it does not know failed in every worker, which the pool respawned forever (a hang), and one that kept
    its base's kind was silently rebuilt as the base, encoding differently."""
    try:
        return type(tokenizer_from_dict(tokenizer.to_dict())) is type(tokenizer)
    except TLMError:
        return False


def encode_sources(sources: Sequence[Path], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The token stream `prepare` writes for `sources` (end-of-text between files, the same chunk cuts), as one
    split, and the UTF-8 bytes of its text: what `tlm eval` scores, so a folder scores as training saw it."""
    encode = _Encoder(tokenizer, np.dtype(np.int64))
    parts = [encode(piece) for piece in _pieces(sources, 0, tokenizer.eot_id is not None)]
    return np.concatenate([ids for _, ids, _ in parts]), sum(n for _, _, n in parts)


def count_chars(path: Path) -> int:
    """Characters of `path` as every pass reads it (`_open_text`), warning where it is not valid UTF-8 anywhere in
    it (the first 8 KiB of a Windows-1252 book are often plain ASCII)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            try:
                return sum(len(decoder.decode(block)) for block in iter(lambda: f.read(CHUNK_CHARS), b"")) + \
                    len(decoder.decode(b"", final=True))
            except UnicodeDecodeError:
                log.warning("%s is not valid UTF-8; its undecodable bytes read as U+FFFD", path)
        with _open_text(path) as f:
            return sum(len(block) for block in iter(lambda: f.read(CHUNK_CHARS), ""))
    except OSError as e:
        raise DataError(f"cannot read data file {path} ({e.strerror}); check the path and its permissions") from None


def out_folder(out_dir: Path) -> Path:
    """`out_dir` resolved, as `prepare` replaces it whole by renames: a symlink's target is replaced, not the link
    (which became a plain folder on the link's disk, the old data left behind a hidden link); never the working
    directory or a folder above it (`--out .` had no name to put the hidden folder beside)."""
    where, cwd = out_dir.resolve(), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise DataError(f"cannot prepare into {out_dir}: it holds the working directory, and prepare replaces the "
                        f"whole folder; choose a new folder, such as {out_dir / 'prepared'}")
    return where


def prepare(sources: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            tokenizer: Tokenizer, val_fraction: float = 0.1, workers: int | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Tokenize `sources` into `out_dir`/{train.bin, val.bin, tokenizer.json, manifest.json}; returns the manifest.
    `sources`: a list of files, or one file, folder or glob as `tlm prepare` takes it (`resolve_sources`).

    Stream: the files' text (UTF-8, undecodable bytes as U+FFFD, line endings as they are) back to back, with the
    tokenizer's end-of-text id between consecutive files when it has one (byte and char tokenizers have none).
    Split, nanoGPT's rule on characters: the first int(n_chars * (1 - val_fraction)) characters go to train and
    the rest to val, each side tokenized on its own; a file's separator goes with the file's last character.
    Memory stays flat: a first pass counts characters, the second reads pieces of ~CHUNK_CHARS characters ending
    where a cut changes no ids (`_cut_point`), encoded by `workers` processes (default: every CPU, fewer for a
    small corpus), so scripts that call this need the usual `if __name__ == "__main__":` guard.
    Atomic: everything is written into a hidden folder beside `out_dir`, the manifest last, then renamed into
    place; an existing `out_dir` must be empty, or prepared data with `overwrite` (and hold none of the sources:
    checkpoint.check_out), and is replaced only by a complete new one.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; try 0.1")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}; leave it unset to use every CPU")
    out_dir = out_folder(Path(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose a new or empty output folder")
    if isinstance(sources, (str, os.PathLike)):  # one path was read as a list of one-letter file names
        sources = resolve_sources(sources)
    check_out(out_dir, overwrite, sources, ours=is_prepared, what="prepared data")
    chars = [(Path(p), count_chars(Path(p))) for p in sources]
    sources = [p for p, n in chars if n]
    total = sum(n for _, n in chars)
    if total == 0:
        raise DataError("the data files hold no text; pass non-empty text files")
    split_at = int(total * (1 - val_fraction))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(workers or cpus, -(-total // CHUNK_CHARS)))
    if workers > 1 and not _rebuilds(tokenizer):
        log.warning("tokenizer class %s does not come back as itself from its to_dict(), as worker processes rebuild "
                    "it: encoding in this process", type(tokenizer).__name__)
        workers = 1
    log.info("tokenizing %d files (%d characters) with %d workers", len(sources), total, workers)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")  # hidden; mkdir honours the umask
    tmp.mkdir()
    try:
        tokens, nbytes = {"train": 0, "val": 0}, {"train": 0, "val": 0}
        with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f:
            files = {"train": train_f, "val": val_f}
            pieces = _pieces(sources, split_at, tokenizer.eot_id is not None)
            for split, ids, n in _encoded(pieces, tokenizer, dtype, workers):
                files[split].write(ids.tobytes())
                tokens[split] += len(ids)
                nbytes[split] += n
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        for split, n in tokens.items():
            if n < 2:
                raise DataError(f"the {split} split has {n} token(s), fewer than 2; add text or change val_fraction")
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        manifest = {
            "format": MANIFEST_FORMAT,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
            "dtype": dtype.name,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
            "train_bytes": nbytes["train"], "val_bytes": nbytes["val"],
            "train_chars": split_at, "val_chars": total - split_at,
            "val_fraction": val_fraction,
            "sources": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in sources],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(tmp, manifest)
        replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s: %d train / %d val tokens", out_dir, tokens["train"], tokens["val"])
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest, on disk: written last, it marks the folder complete (is_prepared)."""
    with open(folder / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder holding a manifest.json, which `prepare` writes last (whether it is intact: `load_prepared`)."""
    return (Path(path) / "manifest.json").is_file()


@dataclass(frozen=True)
class PreparedData:
    """A prepared folder: read-only memory-mapped splits, the manifest, and the tokenizer that made them."""

    train: np.memmap
    val: np.memmap
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    path: Path
    """The prepared folder, recorded in a run's config so that --resume finds the same data."""
    train_mask: np.memmap | None = None
    """Conversations (chat_data.prepare_chats): 1 where a token is the assistant's, to learn; None for text."""
    val_mask: np.memmap | None = None
    train_starts: np.memmap | None = None
    """Conversations: where each begins (int64 offsets, the first 0), for windows that begin where they do."""
    val_starts: np.memmap | None = None
    chat_template: str | None = None
    """The chat template conversations were rendered in (a fine-tuned run keeps it)."""

    @property
    def pairs(self) -> bool:
        """Preference pairs (chat_data.encode_pair): the examples two by two, chosen then rejected; trained by DPO."""
        return bool(self.manifest.get("pairs"))


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Open a folder written by `prepare`, checking the manifest against the files' sizes."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path} is not a prepared data folder (no manifest.json); run prepare on your text first")
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        dtype = np.dtype(_DTYPES[m["dtype"]])
        valid = m["format"] == MANIFEST_FORMAT and all(
            type(m[f"{s}_tokens"]) is int and m[f"{s}_tokens"] >= 2 for s in ("train", "val"))
        vocab_size = m["tokenizer"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{manifest_path} is unreadable or corrupt ({e!r}); run prepare again") from None
    if not valid:
        raise DataError(f"{manifest_path} is corrupt or of another format version; run prepare again")
    splits = {}
    for split in ("train", "val"):
        file, n = path / f"{split}.bin", m[f"{split}_tokens"]
        if not file.is_file():
            raise DataError(f"{file} is missing; the folder is damaged: run prepare again")
        if file.stat().st_size != n * dtype.itemsize:
            raise DataError(f"{file} has {file.stat().st_size} bytes, but the manifest says {n} {dtype.name} tokens "
                            f"({n * dtype.itemsize} bytes); the folder is damaged: run prepare again")
        splits[split] = np.memmap(file, dtype=dtype, mode="r", shape=(n,))
        if m.get("masked"):
            file = path / f"{split}.mask.bin"
            if not file.is_file() or file.stat().st_size != n:
                raise DataError(f"{file} is missing or not one byte per token; the folder is damaged: prepare it "
                                "again")
            splits[f"{split}_mask"] = np.memmap(file, dtype=np.uint8, mode="r", shape=(n,))
            splits[f"{split}_starts"] = _conversation_starts(path / f"{split}.starts.bin", m, split)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    if tokenizer.vocab_size != vocab_size:
        raise DataError(f"{path}/tokenizer.json has {tokenizer.vocab_size} tokens, the manifest {vocab_size}; "
                        "run prepare again")
    return PreparedData(splits["train"], splits["val"], m, tokenizer, path.resolve(), splits.get("train_mask"),
                        splits.get("val_mask"), splits.get("train_starts"), splits.get("val_starts"),
                        read_chat_template(path) if m.get("masked") else None)


def _conversation_starts(file: Path, manifest: dict[str, Any], split: str) -> np.memmap:
    """A masked split's {split}.starts.bin: one int64 offset per conversation, ascending from 0 within the split."""
    if not file.is_file():
        raise DataError(f"{file} is missing: the folder was prepared by an earlier version, which did not record "
                        "where each conversation starts; prepare the conversations again")
    n, count = manifest[f"{split}_tokens"], manifest.get(f"{split}_conversations")
    if type(count) is not int or count < 1 or file.stat().st_size != 8 * count or \
            (manifest.get("pairs") and count % 2):  # pairs: two examples each
        raise DataError(f"{file} is not one int64 offset per conversation of the manifest; the folder is damaged: "
                        "prepare it again")
    starts = np.memmap(file, dtype=np.int64, mode="r", shape=(count,))
    if starts[0] != 0 or starts[-1] >= n or (count > 1 and not (np.diff(starts) > 0).all()):
        raise DataError(f"{file} holds offsets that are not ascending from 0 within the split's {n} tokens; the "
                        "folder is damaged: prepare it again")
    return starts
