"""Llama-family tokenizers, as shipped with llama2.c checkpoints (interop/llama2c.py) and Hugging Face folders that
carry a SentencePiece `tokenizer.model` (interop/hf.py). Not in TOKENIZER_KINDS: they are imported with a model, not
built for training. Id 1 is BOS, which llama2.c puts before every document and stops generating at, so it serves as
eot_id; id 2 is EOS. `tokenizers.tokenizer_from_dict` rebuilds them from a run folder's tokenizer.json.
"""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import TokenizerError
from .tokenizers import SPACE_PIECE, Tokenizer, _utf8

LLAMA_BOS, LLAMA_EOS = 1, 2


class Llama2cTokenizer(Tokenizer):
    """llama2.c's `tokenizer.bin`: pieces with scores, encoded exactly as llama2.c's `encode` in run.c does.

    Encoding: a dummy-prefix space, one piece per UTF-8 character (its bytes as <0xXX> ids 3 + byte when the character
    is not a piece), then repeatedly merge the adjacent pair whose concatenation is the highest-scoring piece
    (leftmost on ties). No BOS is added. Decoding follows run.c's `decode`: <0xXX> pieces are raw bytes, a piece right
    after BOS loses its leading space, and BOS itself prints nothing.
    """

    kind = "llama2c"

    def __init__(self, pieces: Sequence[str], scores: Sequence[float]):
        if len(pieces) != len(scores) or len(pieces) < 3 + 256:
            raise TokenizerError(f"a llama2c tokenizer needs as many scores as pieces and >= 259 of them "
                                 f"(got {len(pieces)} pieces, {len(scores)} scores); rebuild it")
        self.pieces, self.scores = list(pieces), [float(s) for s in scores]
        self._ids: dict[str, int] = {}
        for i, p in enumerate(self.pieces):  # run.c's bsearch returns any of equal pieces; keep the first
            self._ids.setdefault(p, i)
        self._bytes = [self._piece_bytes(p) for p in self.pieces]

    @staticmethod
    def _piece_bytes(piece: str) -> bytes:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.encode("utf-8")

    @classmethod
    def from_bin(cls, path: str | Path) -> Llama2cTokenizer:
        """Read llama2.c's tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, bytes."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read llama2.c tokenizer {path} ({e})") from None
        pieces, scores, off = [], [], 4
        try:
            (max_len,) = struct.unpack_from("<i", data, 0)
            while off < len(data):
                score, n = struct.unpack_from("<fi", data, off)
                if not 0 <= n <= max_len:
                    raise ValueError(f"token {len(pieces)} has length {n}, outside [0, max_token_length={max_len}]")
                pieces.append(data[off + 8:off + 8 + n].decode("utf-8"))
                scores.append(score)
                off += 8 + n
            if off != len(data):
                raise ValueError("the last token runs past the end of the file")
        except (struct.error, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise TokenizerError(f"{path} is not a llama2.c tokenizer.bin ({e})") from None
        return cls(pieces, scores)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def eot_id(self) -> int | None:
        return LLAMA_BOS

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token: llama2.c starts every prompt with it."""
        return LLAMA_BOS

    def _char_ids(self, ch: str) -> list[int]:
        i = self._ids.get(ch)
        return [i] if i is not None else [3 + b for b in _utf8(ch)]

    def encode(self, text: str) -> list[int]:
        return self._encode(text, dummy_prefix=True)

    def encode_continuation(self, text: str) -> list[int]:
        return self._encode(text, dummy_prefix=False)

    def _encode(self, text: str, dummy_prefix: bool) -> list[int]:
        if not text:
            return []
        ids = self._char_ids(" ") if dummy_prefix else []
        for ch in text:
            ids.extend(self._char_ids(ch))
        # A doubly linked list over the symbols, and a heap of candidate merges keyed by (-score, left position):
        # popping gives run.c's choice (best score, leftmost on ties) in O(n log n) instead of its O(n^2) rescans.
        n = len(ids)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                m = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[j]])
                if m is not None:
                    heapq.heappush(heap, (-self.scores[m], i, j, ids[i], ids[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, j, a, b = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and ids[i] == a and ids[j] == b):
                continue  # stale: a neighbour was merged since this pair was pushed
            ids[i] = self._ids[self.pieces[a] + self.pieces[b]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [t for t, keep in zip(ids, alive) if keep]

    def decode_bytes(self, ids: Sequence[int], prev: int | None = None) -> bytes:
        """The bytes run.c prints for `ids` (without its safe_printf filter); `prev` is the id before them. After BOS
        run.c strips a leading space from the piece's text, before reading <0xXX>: the byte piece <0x20> keeps its
        space, as in SentencePiece's decode."""
        out = []
        for i in self._check_ids(ids):
            if i != LLAMA_BOS:
                strip = prev == LLAMA_BOS and self.pieces[i].startswith(" ")
                out.append(self._bytes[i][1:] if strip else self._bytes[i])
            prev = i
        return b"".join(out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "pieces": self.pieces, "scores": self.scores}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Llama2cTokenizer:
        if not isinstance(d.get("pieces"), list) or not isinstance(d.get("scores"), list):
            raise TokenizerError("the saved llama2c tokenizer has no 'pieces' and 'scores' lists; rebuild it")
        return cls(d["pieces"], d["scores"])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`tokenizer.model`), run by the `sentencepiece` library (`pip install sentencepiece`).

    The serialized model is kept (base64) in `to_dict`, so a run folder needs no other file. Encoding adds no BOS.
    `eot` is the id that ends a sample: by default BOS, as llama2.c stops there; Hugging Face Llama folders name EOS.
    `stop` holds other ids that end a sample (a folder's further end-of-sequence ids).
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, eot: int | None = None, stop: Sequence[int] = ()):
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError("SentencePiece tokenizers need the sentencepiece package: "
                                 "pip install 'transformer-lm[sentencepiece]'") from None
        self.model_proto = bytes(model_proto)
        self.eot, self.stop = eot, list(stop)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError for a malformed proto
            raise TokenizerError(f"not a SentencePiece model ({e})") from None

    @classmethod
    def from_file(cls, path: str | Path, eot: int | None = None, stop: Sequence[int] = ()) -> SentencePieceTokenizer:
        try:
            proto = Path(path).read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read SentencePiece model {path} ({e})") from None
        try:
            return cls(proto, eot, stop)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eot_id(self) -> int | None:
        return self.eot if self.eot is not None else self.bos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([*super().stop_ids, *self.stop]))

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, when the model has one."""
        bos = self.sp.bos_id()
        return bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return self.sp.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        ids = self.encode(text)
        return ids[1:] if ids and ids[0] == self._dummy_prefix_id else ids

    @functools.cached_property
    def _dummy_prefix_id(self) -> int | None:
        """The id of a lone '▁' when the model puts one before every text (its normalizer's add_dummy_prefix, which
        the library offers no switch for), else None. Dropping it from a continuation that starts with a line break,
        as `prepare`'s chunks do, gives the whole text's ids: the '▁' cannot merge with the line break."""
        pieces = self.sp.encode_as_pieces("x")
        space = self.sp.piece_to_id(SPACE_PIECE)
        return space if pieces and pieces[0].startswith(SPACE_PIECE) and self.sp.id_to_piece(space) == SPACE_PIECE \
            else None

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(self._check_ids(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_proto": base64.b64encode(self.model_proto).decode("ascii"), "eot": self.eot,
                "stop": self.stop}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SentencePieceTokenizer:
        try:
            proto = base64.b64decode(d["model_proto"], validate=True)
        except (KeyError, TypeError, binascii.Error) as e:
            raise TokenizerError(f"the saved sentencepiece tokenizer is corrupt ({e!r}); rebuild it") from None
        stop = d.get("stop", [])  # absent in run folders imported before it was kept
        if not isinstance(stop, list) or not all(type(i) is int for i in stop):
            raise TokenizerError(f"the saved sentencepiece tokenizer's 'stop' is not a list of ids ({stop!r}); "
                                 "rebuild it with tlm convert")
        return cls(proto, d.get("eot"), stop)
