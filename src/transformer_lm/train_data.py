"""What a run trains on: raw text prepared once into a cache and reused, conversations prepared likewise
(chat_data.py), a folder `tlm prepare` wrote as it is, or on --resume the data the run recorded."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .chat_data import chat_tokenizer, example_files, prepare_chats
from .data import PreparedData, default_corpus, is_prepared, load_prepared, prepare, read_sources, resolve_sources
from .errors import CheckpointError, ConfigError, RunExistsError
from .tokenizers import TOKENIZER_KINDS, Tokenizer, build_tokenizer

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where raw text given to `tlm train` is prepared once and reused: $TLM_CACHE_DIR or ~/.cache/transformer-lm."""
    return Path(os.environ.get("TLM_CACHE_DIR") or Path.home() / ".cache" / "transformer-lm")


CACHE_VERSION = 3
"""Part of the raw-text cache's key: raised whenever the same text and tokenizer settings would now give other ids,
so that a cache entry prepared by an older version is prepared again, not trained on (2: a chunk is no longer cut
before \x1c-\x1f, where GPT-2's BPE split differently; 3: a file's later chunks no longer start with a Llama-family
tokenizer's BOS or dummy-prefix space). A resumed run keeps the folder it recorded."""


def training_data(data: str | Path | None, tokenizer: str | Tokenizer | None = None, vocab_size: int | None = None,
                  gpt2_dir: str | Path | None = None, chat_template: str | None = None) -> PreparedData:
    """Data for `tlm train`: a folder made by `tlm prepare` is used as it is (a `tokenizer` other than the one it was
    prepared with is a ConfigError, not ignored); raw text (a file, folder or glob, or by default the Python standard
    library's source) is prepared into the cache with `tokenizer` (a kind, default byte, or a Tokenizer itself: a
    fine-tune's, that of the run it starts from), keyed by the files' paths, sizes and times (`_stamp`) and the
    tokenizer settings (GPT-2's files stamped too), so a second run starts at once. A .jsonl file of conversations
    is prepared by chat_data.prepare_chats, rendered in `chat_template` (a supervised fine-tune's data: see there)."""
    given = tokenizer if isinstance(tokenizer, Tokenizer) else None
    files = example_files(data)
    if files is not None:
        return _chat_data(files, given, None if given else tokenizer, chat_template)
    if chat_template is not None:
        what = data or "the default corpus"
        raise ConfigError(f"a chat template applies to conversations (a .jsonl file), and {what} is text; drop it, "
                          "or give conversations")
    if data is not None and is_prepared(data):
        prepared = load_prepared(data)
        if given is not None and given.to_dict() != prepared.tokenizer.to_dict():
            raise ConfigError(f"{data} was prepared with another tokenizer ({prepared.tokenizer.kind}) than the run "
                              "being fine-tuned has; give the raw text, which is tokenized with the run's")
        if given is None and tokenizer is not None and tokenizer != prepared.tokenizer.kind:
            raise ConfigError(f"{data} was prepared with the {prepared.tokenizer.kind} tokenizer; --tokenizer "
                              f"{tokenizer} applies to raw text only: drop it, or prepare the text again with "
                              f"`tlm prepare ... --tokenizer {tokenizer}`")
        return prepared
    tokenizer = "byte" if tokenizer is None else tokenizer
    if given is None and tokenizer not in TOKENIZER_KINDS:  # before "preparing ... with the X tokenizer" is logged
        build_tokenizer(tokenizer, [])
    sources = default_corpus() if data is None else resolve_sources(data)
    gpt2_files = [Path(gpt2_dir, name) for name in ("encoder.json", "vocab.bpe")] if tokenizer == "gpt2" and \
        gpt2_dir is not None else []
    key = {"sources": [_stamp(p) for p in sources], "tokenizer": tokenizer if given is None else _identity(given),
           "vocab_size": vocab_size if tokenizer == "bpe" else None,
           "gpt2_files": [_stamp(p) for p in gpt2_files if p.is_file()]}
    kind = given.kind if given is not None else tokenizer
    return _cached(key, f"{len(sources)} file(s) with the {kind} tokenizer", lambda out: prepare(
        sources, out, given or build_tokenizer(tokenizer, read_sources(sources), vocab_size, gpt2_dir)))


def _cached(key: dict[str, Any], what: str, make: Callable[[Path], object]) -> PreparedData:
    """The cache's prepared folder for `key` (with CACHE_VERSION), made by `make(folder)` when it is not there yet;
    one that another run (a torchrun rank) prepared meanwhile is used as it is."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **key}).encode()).hexdigest()[:16]
    out = cache_dir() / "prepared" / digest
    if not is_prepared(out):
        log.info("preparing %s into %s", what, out)
        try:
            make(out)
        except RunExistsError:
            if not is_prepared(out):
                raise
            log.info("%s was prepared meanwhile by another run on the same data; using it", out)
    return load_prepared(out)


def _identity(tokenizer: Tokenizer) -> str:
    """A tokenizer given itself (a fine-tune's), for a cache key: the hash of all it is."""
    return hashlib.sha256(json.dumps(tokenizer.to_dict()).encode()).hexdigest()


def _chat_data(paths: list[Path], given: Tokenizer | None, kind: str | None,
               chat_template: str | None) -> PreparedData:
    """Fine-tuning examples prepared into the cache (chat_data.prepare_chats), keyed by the files, tokenizer and
    template (None: a conversation among them is refused)."""
    tok = chat_tokenizer(given, kind)
    key = {"chats": [_stamp(p) for p in paths] if len(paths) > 1 else _stamp(paths[0]), "template": chat_template,
           "tokenizer": _identity(tok), "layout": 2}  # 2: with where each conversation starts (train.starts.bin)
    what = paths[0] if len(paths) == 1 else f"{len(paths)} files"
    return _cached(key, f"the examples of {what} with the {tok.kind} tokenizer",
                   lambda out: prepare_chats(paths, out, tok, chat_template))


def _stamp(path: Path) -> tuple[str, int, int, int]:
    """A file's identity for the cache: its path, size, and modification and change times (the change time moves
    on every write, also where a copy keeps the size and modification time, as `cp -p` and `rsync -a` do)."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns


def resumed_data(run_dir: str | Path) -> tuple[str | None, str]:
    """(what to pass to training_data, the source to record) for resuming a run on the data it was trained on, from
    its config.json: its prepared folder while that exists, else the source it was prepared from (the cache of raw
    text may have been emptied, or hold examples prepared by an earlier version, without where each starts), None
    for the embedded corpus. CheckpointError when neither is left."""
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text())["data"]
        prepared, source = data["prepared"], data["source"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{run_dir}/config.json does not say what data the run was trained on; pass it: tlm "
                              f"train DATA --out {run_dir} --resume true") from None
    stale = Path(prepared, "train.mask.bin").is_file() and not Path(prepared, "train.starts.bin").is_file()
    if is_prepared(prepared) and not stale:
        return prepared, source
    if source == "python-stdlib":
        return None, source
    if glob.glob(source):  # a file, folder or glob that still names text: prepared again, the same way
        return source, source
    raise CheckpointError(f"the data {run_dir} was trained on is gone (neither {prepared} nor {source} exists); "
                          f"pass it: tlm train DATA --out {run_dir} --resume true")
