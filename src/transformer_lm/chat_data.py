"""Supervised fine-tuning data: JSON Lines or Parquet files of examples (one, or a dataset's shards, as the Hugging
Face Hub serves datasets) encoded into the prepared-data format of data.py, with a mask of the tokens to learn (the
rest is context) and where each example starts. A line (a Parquet row: its columns, nulls left out) is one of the
formats fine-tuning datasets ship in (TRL's dataset types, by their columns):
- {"messages": [{"role", "content"}, ...]}: a conversation (OpenAI's fine-tuning format, Hugging Face chat
  datasets), rendered in a chat template (chat.chat_tokens); the assistant's replies are learned;
- {"conversations": [{"from", "value"}, ...]}: the same in ShareGPT's form (from human, gpt, system, tool);
- {"prompt": ..., "completion": ...}: two texts, the completion learned (with an end-of-text after it) and the
  prompt its context, no template (a base model learns to complete); or two lists of messages, a conversation of
  which the completion's replies are learned;
- {"text": ...}: a document learned whole;
- {"prompt": ..., "chosen": ..., "rejected": ...}: a preference pair (texts, or lists of messages), two examples of
  the prompt followed by either completion, learned as the prompt-completion pairs above are; without a prompt (TRL's
  implicit prompt), the prompt is what the two have in common at their start. A file of pairs trains by direct
  preference optimization (preference.py); pairs and other examples do not mix.
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .chat import CHAT_TEMPLATE_FILE, chat_tokens
from .checkpoint import check_out, staged_dir
from .data import MANIFEST_FORMAT, is_prepared, out_folder, resolve_sources, write_manifest
from .errors import ChatError, ConfigError, DataError
from .tokenizers import ByteTokenizer, Tokenizer, save_tokenizer

log = logging.getLogger(__name__)


EXAMPLE_SUFFIXES = (".jsonl", ".parquet")
"""The files of fine-tuning examples: JSON Lines, and Parquet (read with pyarrow: the `parquet` extra)."""


def example_files(data: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path] | None:
    """The .jsonl or .parquet files of fine-tuning examples `data` names (a file, or a folder, glob or list that
    resolves to such files only: a dataset's shards), or None where it names text, or nothing that exists."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):  # a quick look first: a text corpus is not walked twice
        path = Path(data)
        if path.is_file() or (not path.is_dir() and not any(s in str(data) for s in EXAMPLE_SUFFIXES)):
            return [path] if path.is_file() and path.suffix in EXAMPLE_SUFFIXES else None
        if path.is_dir() and not any(next(path.rglob(f"*{s}"), None) for s in EXAMPLE_SUFFIXES):
            return None
    try:
        files = resolve_sources(data, binary=(".parquet",))
    except DataError:  # nothing there: the text path says so
        return None
    return files if all(f.suffix in EXAMPLE_SUFFIXES for f in files) else None


def chat_tokenizer(given: Tokenizer | None, kind: str | None) -> Tokenizer:
    """The tokenizer conversations are encoded with: a run's (`given`: the one fine-tuned), or else the byte one;
    the other kinds are trained on text first, and these are conversations."""
    if given is not None:
        return given
    if kind not in (None, "byte"):
        raise ConfigError(f"conversations are tokenized with the tokenizer of the run they fine-tune or the byte one; "
                          f"--tokenizer {kind} would be trained on them first: drop it (or give the run's)")
    return ByteTokenizer()


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "observation": "tool"}
"""ShareGPT's speakers ("from") as chat templates' roles."""

_FORMATS = ('{"messages": [{"role": ..., "content": ...}, ...]}, {"conversations": [{"from": ..., "value": ...}, '
            '...]}, {"prompt": ..., "completion": ...}, {"text": ...} or {"prompt": ..., "chosen": ..., '
            '"rejected": ...}')


def read_examples(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The examples of a JSON Lines file, each non-empty line's (number, object); DataError naming the first line
    that is no JSON object. Of a Parquet file, each row's (number from 1, its non-null columns)."""
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the examples in {path} ({e}); give a UTF-8 JSON Lines file") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n} is not JSON ({e}); each line must be one example: {_FORMATS}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n} is not a JSON object; each line must be one example: {_FORMATS}")
        rows.append((n, row))
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """A Parquet file's rows as read_examples gives them, a batch of rows at a time. A null column is left out, as
    a JSON line leaves out a key it does not have (every row of a table has every column)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is a Parquet file, which tlm reads with pyarrow: pip install pyarrow (or "
                        "transformer-lm[parquet])") from None
    try:
        batches = pq.ParquetFile(path).iter_batches()
        rows = [{k: v for k, v in row.items() if v is not None} for batch in batches for row in batch.to_pylist()]
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (not Parquet, damaged) is a ValueError
        raise DataError(f"cannot read the examples in {path} ({e}); give a Parquet file of examples") from None
    return list(enumerate(rows, 1))


def _sharegpt(turns: list[Any]) -> list[dict[str, Any]]:
    """ShareGPT's turns as messages."""
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"a turn is not {{\"from\": one of {sorted(SHAREGPT_ROLES)}, \"value\": ...}}: {turn!r}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    return messages


def _plain(tokenizer: Tokenizer, context: str, learned: str) -> tuple[list[int], list[bool]]:
    """`context` then `learned` (and an end-of-text, which is learned too), encoded apart as a sample's prompt and
    continuation are (generate.sample_prompt: with the BOS a Llama-family model expects first). The first token is
    never learned: nothing of its example comes before it (packed, it would be learned from the one before)."""
    head = tokenizer.encode(context) if context else []
    if tokenizer.bos_id is not None and head[:1] != [tokenizer.bos_id]:
        head = [tokenizer.bos_id, *head]
    tail = (tokenizer.encode_continuation(learned) if head else tokenizer.encode(learned)) + \
        ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
    return head + tail, [False] * max(1, len(head)) + [True] * (len(tail) - (not head))


def encode_example(row: dict[str, Any], template: str | None, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """One example (see the module docstring) as (ids, which are learned). A conversation without a `template` to
    render it in is a ConfigError naming the fix."""
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return _plain(tokenizer, row["prompt"], row["completion"])
    if isinstance(row.get("text"), str):
        if not row["text"]:
            raise DataError("its text is empty")
        return _plain(tokenizer, "", row["text"])
    learn_from = 0
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
    elif isinstance(row.get("conversations"), list):
        messages = _sharegpt(row["conversations"])
    elif isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        messages, learn_from = row["prompt"] + row["completion"], len(row["prompt"])
    else:
        raise DataError(f"it is none of the formats an example may take: {_FORMATS}")
    if template is None:
        raise ConfigError("it holds a conversation, which is rendered in a chat template, and there is none: use a "
                          "run that has one (tlm train --train.init_from RUN, tlm prepare --tokenizer_from RUN), or "
                          "give one (--chat_template FILE)")
    return chat_tokens(template, messages, tokenizer, learn_from)


def is_pair(row: dict[str, Any]) -> bool:
    """Whether an example is a preference pair (it has "chosen" and "rejected")."""
    return "chosen" in row and "rejected" in row


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a pair without a prompt: the prompt is the two completions' common start
    (messages, or characters: then one space before the first that differs goes with the completions, which a
    BPE tokenizer encodes as part of their first word), as TRL's extract_prompt splits them."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def encode_pair(row: dict[str, Any], template: str | None,
                tokenizer: Tokenizer) -> list[tuple[list[int], list[bool]]]:
    """A preference pair as its two examples, [chosen, rejected], each (ids, which are learned): the prompt and the
    completion encoded as encode_example encodes a prompt-completion pair, texts or messages alike."""
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    kind = type(chosen)
    if kind not in (str, list) or not all(type(v) is kind for v in (rejected, *([] if prompt is None else [prompt]))):
        raise DataError('its prompt, chosen and rejected are not all texts or all lists of messages: {"prompt": '
                        '"...", "chosen": "...", "rejected": "..."} or the same with [{"role", "content"}, ...]')
    if prompt is None:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    if chosen == rejected:
        raise DataError("its chosen and rejected completions are the same; a pair prefers one of two different ones")
    sides = []
    for completion in (chosen, rejected):
        sides.append(_plain(tokenizer, prompt, completion) if kind is str else
                     encode_example({"prompt": prompt, "completion": completion}, template, tokenizer))
        if not any(sides[-1][1][1:]):
            raise DataError("one of its completions has no token to learn (no assistant reply in it)")
    return sides


def encode_chats(paths: Sequence[Path], template: str | None,
                 tokenizer: Tokenizer) -> tuple[list[tuple[array, array]], bool]:
    """Each example of the files `paths` (in order) as encode_example encodes it, (ids, which are learned) as
    compact arrays (int32, uint8), and whether they are preference pairs, each then two examples in a row
    (encode_pair: chosen, rejected). A file mixing pairs and other examples is a DataError."""
    encoded: list[tuple[array, array]] = []
    pairs, plain = None, False  # whether the examples are pairs (as the first is); whether one is plain text
    for path in paths:
        for n, row in read_examples(path):
            try:
                if pairs is not None and is_pair(row) != pairs:
                    raise DataError("it mixes preference pairs (chosen, rejected) with other examples; a run trains "
                                    "on pairs (DPO) or on examples to learn: give them in separate runs")
                pairs = is_pair(row)
                if pairs:
                    encoded.extend(map(_compact, encode_pair(row, template, tokenizer)))
                else:
                    encoded.append(_compact(encode_example(row, template, tokenizer)))
            except (ChatError, ConfigError, DataError) as e:
                raise type(e)(f"{path}:{n}: {e}") from None
            plain = plain or isinstance(row.get("completion", row.get("text", row.get("chosen"))), str)
    if tokenizer.eot_id is None and plain:
        log.warning("the %s tokenizer has no end-of-text token: completions are learned without an end mark, so "
                    "samples of the model end at max_new_tokens or a stop string", tokenizer.kind)
    return encoded, bool(pairs)


def _compact(example: tuple[list[int], list[bool]]) -> tuple[array, array]:
    """An example's ids and mask as compact arrays (int32, uint8): 5 bytes a token where Python's lists take 16
    (ids below 257, which Python caches) to 48, as a whole dataset is held until it is written."""
    ids, mask = example
    return array("i", ids), array("B", mask)


def joined(encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
           dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Examples back to back: their ids (of `dtype`), their mask (uint8, 1 where learned) and where each begins
    (int64 offsets, the first 0)."""
    ids = np.concatenate([np.zeros(0, dtype), *(np.asarray(chat_ids, dtype=dtype) for chat_ids, _ in encoded)])
    mask = np.concatenate([np.zeros(0, np.uint8), *(np.asarray(chat_mask, dtype=np.uint8) for _, chat_mask in encoded)])
    starts = np.cumsum([0] + [len(chat_ids) for chat_ids, _ in encoded[:-1]], dtype=np.int64)
    return ids, mask, starts


def prepare_chats(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, tokenizer: Tokenizer,
                  template: str | None, val_fraction: float = 0.1, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tuning examples (conversations, prompt-completion pairs, documents) into `out_dir`: encoded (encode_chats)
    back to back into train.bin / val.bin as data.prepare writes them, with train.mask.bin / val.mask.bin beside
    them (one byte per token: 1 where learned, which training learns and evaluation scores), train.starts.bin /
    val.starts.bin (where each example begins: int64 offsets, windows begin there) and the template conversations
    were rendered in as chat_template.jinja. The last val_fraction of the examples (at least one) are the val split
    (the manifest counts them as conversations). Of preference pairs, each pair's chosen example comes before its
    rejected one, the val split takes whole pairs, and the manifest says "pairs": true. `paths`: the .jsonl files,
    one after another (example_files).
    Written atomically, the manifest last, as data.prepare writes."""
    paths, out_dir = [Path(p) for p in paths], out_folder(Path(out_dir))
    path = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"  # for the messages
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; try 0.1")
    check_out(out_dir, overwrite, paths, ours=is_prepared, what="prepared data")
    encoded, pairs = encode_chats(paths, template, tokenizer)
    per = 2 if pairs else 1  # examples per item: a pair's two are never split apart
    if len(encoded) < 2 * per:
        raise DataError(f"{path} holds {len(encoded) // per} {'pair' if pairs else 'example'}(s); a train and a val "
                        "split need at least 2")
    n_val = max(1, round(len(encoded) // per * val_fraction)) * per
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    counts = {}
    with staged_dir(out_dir, overwrite) as tmp:
        for split, part in (("train", encoded[:-n_val]), ("val", encoded[-n_val:])):
            ids, mask, starts = joined(part, dtype)
            if not mask[1:].any():
                raise DataError(f"the {split} split of {path} has nothing to learn (no assistant turn, completion "
                                "or text); add examples with replies")
            for name, array in ((f"{split}.bin", ids), (f"{split}.mask.bin", mask), (f"{split}.starts.bin", starts)):
                with open(tmp / name, "wb") as f:  # on disk before the manifest names them
                    f.write(array.tobytes())
                    f.flush()
                    os.fsync(f.fileno())
            counts[split] = (len(ids), tokenizer.num_bytes(ids.tolist()), int(mask.sum()), len(part))
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        if template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        manifest = {
            "format": MANIFEST_FORMAT, "masked": True, **({"pairs": True} if pairs else {}),
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}, "dtype": dtype.name,
            **{f"{split}_{k}": c[i] for split, c in counts.items()
               for i, k in enumerate(("tokens", "bytes", "learned_tokens", "conversations"))},
            "val_fraction": val_fraction,
            "sources": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(tmp, manifest)
    log.info("prepared %s: %d examples, %d train / %d val tokens (%d / %d of them learned)", out_dir,
             len(encoded), counts["train"][0], counts["val"][0], counts["train"][2], counts["val"][2])
    return manifest
