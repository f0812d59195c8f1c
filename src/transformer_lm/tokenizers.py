"""Tokenizers behind one interface: raw bytes, characters, a BPE trained on your corpus, and GPT-2's BPE.

Every tokenizer serializes to a self-contained JSON dict (`to_dict`), so a run folder can rebuild it with no
other files. The two BPE kinds are byte-level: every string encodes, and decoding any ids gives valid text
(incomplete UTF-8 sequences become U+FFFD). In those kinds the literal text '<|endoftext|>' encodes to the
end-of-text id, as tiktoken does with `allowed_special="all"`, so documents joined with it keep the separator.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from transformer_lm.errors import ConfigError, DataError, TLMError, TokenizerError

TOKENIZER_KINDS = ("byte", "char", "bpe", "gpt2")
EOT = "<|endoftext|>"
SPACE_PIECE = "\u2581"  # SentencePiece's visible space, "▁"
DEFAULT_BPE_VOCAB_SIZE = 4096


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of `text`; a lone surrogate (not valid Unicode text) becomes a TokenizerError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text has a lone surrogate {text[e.start]!r} at position {e.start}, which is not valid Unicode "
            "(bytes that are not UTF-8, read by Python as surrogates); pass UTF-8 text"
        ) from None


class Tokenizer(ABC):
    """Maps text to token ids and back."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id this tokenizer produces is in range(vocab_size)."""

    @property
    def eot_id(self) -> int | None:
        """Id of '<|endoftext|>', used to separate documents; None when the tokenizer has no such token."""
        return None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a sample: eot_id, and for a model imported from a folder that lists several end-of-sequence
        ids (Llama 3's <|end_of_text|>, <|eom_id|> and <|eot_id|>), all of them, eot_id first."""
        return (self.eot_id,) if self.eot_id is not None else ()

    @property
    def bos_id(self) -> int | None:
        """Id that begins every sequence the model was trained on (Llama-family tokenizers); None when there is none."""
        return None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` where it continues a longer text (a data chunk after a file's first), as they stand inside
        encode() of the whole: without what one encode() call puts at its start only (an imported tokenizer's BOS,
        SentencePiece's dummy-prefix space), which `prepare` would otherwise add once per ~1 MiB chunk. Byte, char
        and GPT-2-style BPE tokenizers add nothing there: this is encode()."""
        return self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def num_bytes(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes of the text `ids` stand for (for bits per byte); an end-of-text separator stands for none, and
        so does the BOS an imported tokenizer.json's post-processor puts first (decoded, Llama 3's is 17 bytes of
        '<|begin_of_text|>', which bits per byte took off a text's bytes). Exact for a whole text; a stretch cut
        inside a character counts a U+FFFD (3 bytes) for it."""
        marks = {self.eot_id, self.bos_id}
        return len(self.decode([i for i in ids if i not in marks]).encode("utf-8"))

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable, self-contained description; `tokenizer_from_dict` rebuilds the tokenizer."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer: ...

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """Plain ints (numpy and torch scalars accepted), each checked to be in the vocabulary."""
        ids, n = [int(i) for i in ids], self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise TokenizerError(
                f"token id {bad} is outside this {self.kind} tokenizer's vocabulary (size {self.vocab_size}); "
                "decode only ids the model can sample from the tokenizer's vocabulary"
            )
        return ids


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes: needs no training and encodes anything."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(self._check_ids(ids)).decode("utf-8", errors="replace")

    def num_bytes(self, ids: Sequence[int]) -> int:
        return len(ids)  # one byte an id, a character cut at either end included

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteTokenizer:
        return cls()


class CharTokenizer(Tokenizer):
    """One id per character seen in the training corpus, in sorted order (so the ids don't depend on file order)."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise TokenizerError("a char tokenizer needs a non-empty list of single characters; rebuild it")
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Collect the character set one text at a time, so a streamed corpus is never held in memory."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise DataError("the corpus has no characters to build a char tokenizer from; check the input files")
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            pos = text.index(e.args[0])
            raise TokenizerError(
                f"character {e.args[0]!r} at position {pos} is not in the char tokenizer's vocabulary; "
                "remove it from the text, or train on a corpus containing it (or with the byte tokenizer)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in self._check_ids(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        if not isinstance(d.get("chars"), list):
            raise TokenizerError("the saved char tokenizer has no 'chars' list; rebuild it")
        return cls(d["chars"])


class _HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` byte-level BPE, which encodes batches in parallel in Rust."""

    def __init__(self, hf: HFTokenizer):
        # A tokenizer.json saved with truncation or padding on (after a fine-tune's batching) made every encode cut
        # the text at max_length (a 1 MiB data chunk to 512 ids) and pad a batch with pad ids; transformers applies
        # neither unless a call asks, and neither belongs in a token stream.
        hf.no_truncation()
        hf.no_padding()
        self.hf = hf

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        return self.hf.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.hf.encode_batch(texts)]
        except TypeError:  # for a lone surrogate the Rust side says only "must be str": name it instead
            for text in texts:
                if isinstance(text, str):
                    _utf8(text)
            raise

    def decode(self, ids: Sequence[int]) -> str:
        # Keep special tokens so decode(encode(text)) == text even when text contains '<|endoftext|>'.
        return self.hf.decode(self._check_ids(ids), skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": json.loads(self.hf.to_str())}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _HFTokenizer:
        try:
            return cls(HFTokenizer.from_str(json.dumps(d["tokenizer"])))
        except Exception as e:  # a missing entry, or the plain Exception the Rust side raises for malformed JSON
            raise TokenizerError(f"the saved {cls.kind} tokenizer is corrupt ({e!r}); rebuild it") from None


def _byte_level(model: models.BPE) -> HFTokenizer:
    """GPT-2's byte-level pipeline with no normalizer and no prefix space, so decoding restores text exactly."""
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


class BPETokenizer(_HFTokenizer):
    """Byte-level BPE trained on the user's corpus; the 256 byte symbols are always in the vocabulary."""

    kind = "bpe"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> BPETokenizer:
        """The vocabulary may come out smaller than `vocab_size` when the corpus runs out of pairs to merge. One
        string is one text: iterated, it was a stream of one-character texts, with no pair to merge (257 ids).
        The trainer sees the text between '<|endoftext|>' separators: `tokenizers` trains on the separator as text,
        spending ids on its pieces ('<|', 'endoftext', '|>', ...) that encoding never yields there."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ConfigError(f"bpe vocab_size must be an integer >= 257 (256 bytes + {EOT}), got {vocab_size!r}")
        hf = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator((part for text in texts for part in text.split(EOT)), trainer=trainer)
        return cls(hf)


class GPT2Tokenizer(_HFTokenizer):
    """GPT-2's BPE from the user's `encoder.json` + `vocab.bpe`, built with `tokenizers` directly.

    transformers' `GPT2TokenizerFast(vocab_file=...)` can silently build a tiny tokenizer, hence this.
    """

    kind = "gpt2"

    @classmethod
    def from_files(cls, folder: str | Path) -> GPT2Tokenizer:
        folder = Path(folder)
        try:
            encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
            lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as e:
            raise TokenizerError(
                f"cannot read GPT-2 BPE files in {folder} ({e}); put encoder.json and vocab.bpe there"
            ) from None
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if EOT not in encoder or any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{folder}: encoder.json lacks {EOT} or vocab.bpe is malformed; use GPT-2's files")
        try:
            hf = _byte_level(models.BPE(vocab=encoder, merges=merges))
        except Exception as e:  # e.g. a merge whose parts are not in encoder.json
            raise TokenizerError(
                f"{folder}: encoder.json and vocab.bpe do not match ({e}); use GPT-2's files"
            ) from None
        hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        tok = cls(hf)
        if tok.vocab_size != len(encoder) or tok.eot_id != encoder[EOT]:
            raise TokenizerError(f"{folder}: built {tok.vocab_size} tokens from {len(encoder)}; use GPT-2's files")
        return tok


class HFFileTokenizer(_HFTokenizer):
    """Any Hugging Face `tokenizer.json`, as imported with a model by `tlm convert` (kind "hf").

    Encoding applies the file's post-processor, so a Llama tokenizer prepends its BOS as the model expects. `eot`
    names the model's end-of-sequence token (from its tokenizer_config.json or config.json), which separates
    documents and ends a sample; without one, '<|endoftext|>' is used when the vocabulary has it. `stop` names the
    other tokens that end a sample (the rest of the folder's end-of-sequence ids, as transformers' generate stops at
    each of them).
    """

    kind = "hf"

    def __init__(self, hf: HFTokenizer, eot: str | None = None, bos: str | None = None, stop: Sequence[str] = ()):
        super().__init__(hf)
        self.eot, self.bos, self.stop = eot, bos, list(stop)
        for name in (eot, bos, *self.stop):
            if name is not None and hf.token_to_id(name) is None:
                raise TokenizerError(f"special token {name!r} is not in the tokenizer's vocabulary; fix the "
                                     "tokenizer_config.json, config.json or generation_config.json beside "
                                     "tokenizer.json")

    @property
    def eot_id(self) -> int | None:
        return self.hf.token_to_id(self.eot) if self.eot is not None else super().eot_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([*super().stop_ids, *(self.hf.token_to_id(name) for name in self.stop)]))

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, when the model has one."""
        return self.hf.token_to_id(self.bos) if self.bos is not None else None

    def encode_continuation(self, text: str) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids  # no post-processor: no BOS
        if ids and ids[0] == self._dummy_prefix_id:
            ids = ids[1:]
        return ids

    @functools.cached_property
    def _dummy_prefix_id(self) -> int | None:
        """The id of a lone '▁' when this tokenizer puts one before every text (a Llama 2 tokenizer.json's Prepend
        normalizer or Metaspace pre-tokenizer), else None."""
        pieces = self.hf.encode("x", add_special_tokens=False).tokens
        return self.hf.token_to_id(SPACE_PIECE) if pieces and pieces[0].startswith(SPACE_PIECE) else None

    @classmethod
    def from_file(cls, path: str | Path, eot: str | None = None, bos: str | None = None,
                  stop: Sequence[str] = ()) -> HFFileTokenizer:
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for unreadable or malformed files
            raise TokenizerError(f"cannot read Hugging Face tokenizer {path} ({e}); point to a tokenizer.json"
                                 ) from None
        return cls(hf, eot, bos, stop)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "eot": self.eot, "bos": self.bos, "stop": self.stop}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFFileTokenizer:
        stop = d.get("stop", [])  # absent in run folders imported before it was kept
        if not isinstance(stop, list) or not all(isinstance(name, str) for name in stop):
            raise TokenizerError(f"the saved hf tokenizer's 'stop' is not a list of token names ({stop!r}); rebuild "
                                 "it with tlm convert")
        return cls(super().from_dict(d).hf, d.get("eot"), d.get("bos"), stop)


# "hf" tokenizers are only imported (tlm convert), never built from a corpus: they are loadable, not in TOKENIZER_KINDS.
_CLASSES: dict[str, type[Tokenizer]] = {
    c.kind: c for c in (ByteTokenizer, CharTokenizer, BPETokenizer, GPT2Tokenizer, HFFileTokenizer)}


def _unknown_kind(kind: object) -> ConfigError:
    return ConfigError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    if d.get("kind") in ("llama2c", "sentencepiece"):  # imported with a model: llama_tokenizers.py
        from .llama_tokenizers import Llama2cTokenizer, SentencePieceTokenizer

        _CLASSES.update({c.kind: c for c in (Llama2cTokenizer, SentencePieceTokenizer)})
    if d.get("kind") not in _CLASSES:
        raise _unknown_kind(d.get("kind"))
    return _CLASSES[d["kind"]].from_dict(d)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write JSON atomically, so a crash mid-write never leaves a half-written tokenizer beside a checkpoint."""
    from .checkpoint import share  # checkpoint imports torch: only when a tokenizer is saved

    path = Path(path)
    text = json.dumps(tok.to_dict())
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            share(tmp)  # mkstemp makes it 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise TokenizerError(
            f"cannot write tokenizer file {path} ({e}); check the folder exists and is writable"
        ) from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"cannot read tokenizer file {path} ({e}); point to a tokenizer.json this tool saved"
        ) from None
    if not isinstance(d, dict):
        raise TokenizerError(f"tokenizer file {path} does not hold a JSON object; point to one this tool saved")
    try:
        return tokenizer_from_dict(d)
    except TLMError as e:
        raise TokenizerError(f"tokenizer file {path}: {e}") from None


def build_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
    gpt2_dir: str | Path | None = None,
) -> Tokenizer:
    """Build a tokenizer of `kind`.

    `texts` (a stream is fine, or one string) trains `char` and `bpe` and is ignored by the others. `vocab_size` is
    the BPE target (default 4096); the other kinds ignore it, as their size is fixed by their data, so a CLI can pass
    its default for every kind. `gpt2_dir` holds GPT-2's `encoder.json` and `vocab.bpe`.
    """
    if kind not in TOKENIZER_KINDS:
        raise _unknown_kind(kind)
    if kind in ("char", "bpe") and texts is None:
        raise ConfigError(f"the {kind} tokenizer is trained on a corpus; pass texts")
    if kind == "gpt2" and gpt2_dir is None:
        raise ConfigError("the gpt2 tokenizer needs gpt2_dir, a folder with encoder.json and vocab.bpe")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size)
    return GPT2Tokenizer.from_files(gpt2_dir)
