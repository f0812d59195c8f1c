"""Conversations as training and evaluation data: a JSON Lines file of {"messages": [...]} (OpenAI's fine-tuning
format, Hugging Face chat datasets' "messages" column) rendered in a chat template (chat.chat_tokens) into the
prepared-data format of data.py, with a mask of the tokens to learn, the assistant's replies: the rest is context.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .chat import CHAT_TEMPLATE_FILE, chat_tokens
from .checkpoint import check_out, staged_dir
from .data import MANIFEST_FORMAT, is_prepared, out_folder, write_manifest
from .errors import ChatError, ConfigError, DataError
from .tokenizers import ByteTokenizer, Tokenizer, save_tokenizer

log = logging.getLogger(__name__)


def is_chat_file(path: str | os.PathLike | None) -> bool:
    """Whether `path` names a file of conversations (a .jsonl file), rather than text."""
    return path is not None and str(path).endswith(".jsonl") and Path(path).is_file()


def chat_tokenizer(given: Tokenizer | None, kind: str | None) -> Tokenizer:
    """The tokenizer conversations are encoded with: a run's (`given`: the one fine-tuned), or else the byte one;
    the other kinds are trained on text first, and these are conversations."""
    if given is not None:
        return given
    if kind not in (None, "byte"):
        raise ConfigError(f"conversations are tokenized with the tokenizer of the run they fine-tune or the byte one; "
                          f"--tokenizer {kind} would be trained on them first: drop it (or give the run's)")
    return ByteTokenizer()


def read_chats(path: Path) -> list[list[dict[str, Any]]]:
    """The conversations of a JSON Lines file: each non-empty line an object with a "messages" list of {"role",
    "content"}."""
    chats = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the conversations in {path} ({e}); give a UTF-8 JSON Lines file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n} is not JSON ({e}); each line must be one conversation") from None
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise DataError(f"{path}:{n} has no \"messages\" list; each line must be {{\"messages\": [{{\"role\": "
                            f"..., \"content\": ...}}, ...]}}")
        chats.append(row["messages"])
    return chats


def encode_chats(path: Path, template: str, tokenizer: Tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Each conversation of `path` as chat.chat_tokens encodes it: (ids, which are the assistant's)."""
    encoded = []
    for n, chat in enumerate(read_chats(path), 1):
        try:
            encoded.append(chat_tokens(template, chat, tokenizer))
        except ChatError as e:
            raise ChatError(f"{path}: conversation {n}: {e}") from None
    return encoded


def joined(encoded: list[tuple[list[int], list[bool]]],
           dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conversations back to back: their ids (of `dtype`), their mask (uint8, 1 where the assistant's) and where
    each begins (int64 offsets, the first 0)."""
    ids = np.array([i for chat_ids, _ in encoded for i in chat_ids], dtype=dtype)
    mask = np.array([m for _, chat_mask in encoded for m in chat_mask], dtype=np.uint8)
    starts = np.cumsum([0] + [len(chat_ids) for chat_ids, _ in encoded[:-1]], dtype=np.int64)
    return ids, mask, starts


def prepare_chats(path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Tokenizer, template: str,
                  val_fraction: float = 0.1, overwrite: bool = False) -> dict[str, Any]:
    """Conversations into `out_dir` for supervised fine-tuning: rendered and encoded (encode_chats) back to back into
    train.bin / val.bin as data.prepare writes them, with train.mask.bin / val.mask.bin beside them (one byte per
    token: 1 where the assistant's, which training learns and evaluation scores), train.starts.bin /
    val.starts.bin (where each conversation begins: int64 offsets, windows begin there) and the template as
    chat_template.jinja. The last val_fraction of the conversations (at least one) are the val split. Written
    atomically, the manifest last, as data.prepare writes."""
    path, out_dir = Path(path), out_folder(Path(out_dir))
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; try 0.1")
    check_out(out_dir, overwrite, [path], ours=is_prepared, what="prepared data")
    encoded = encode_chats(path, template, tokenizer)
    if len(encoded) < 2:
        raise DataError(f"{path} holds {len(encoded)} conversation(s); a train and a val split need at least 2")
    n_val = max(1, round(len(encoded) * val_fraction))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    counts = {}
    with staged_dir(out_dir, overwrite) as tmp:
        for split, part in (("train", encoded[:-n_val]), ("val", encoded[-n_val:])):
            ids, mask, starts = joined(part, dtype)
            if not mask[1:].any():
                raise DataError(f"the {split} split of {path} has no assistant turn to learn; add conversations with "
                                "replies")
            for name, array in ((f"{split}.bin", ids), (f"{split}.mask.bin", mask), (f"{split}.starts.bin", starts)):
                with open(tmp / name, "wb") as f:  # on disk before the manifest names them
                    f.write(array.tobytes())
                    f.flush()
                    os.fsync(f.fileno())
            counts[split] = (len(ids), tokenizer.num_bytes(ids.tolist()), int(mask.sum()), len(part))
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        (tmp / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        manifest = {
            "format": MANIFEST_FORMAT, "masked": True,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}, "dtype": dtype.name,
            **{f"{split}_{k}": c[i] for split, c in counts.items()
               for i, k in enumerate(("tokens", "bytes", "learned_tokens", "conversations"))},
            "val_fraction": val_fraction,
            "sources": [{"path": str(path.resolve()), "bytes": path.stat().st_size}],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(tmp, manifest)
    log.info("prepared %s: %d conversations, %d train / %d val tokens (%d / %d the assistant's)", out_dir,
             len(encoded), counts["train"][0], counts["val"][0], counts["train"][2], counts["val"][2])
    return manifest
