"""The small files of a Hugging Face model folder: its JSON files read with one-line errors, and its tokenizer.

Import reads the folder's `tokenizer.json` (kind "hf", with the EOS/BOS tokens named by tokenizer_config.json or
config.json), or else its SentencePiece `tokenizer.model`; every end-of-sequence id of config.json and
generation_config.json ends a sample too (the tokenizer's stop_ids), and export lists them all in config.json and
generation_config.json, so that transformers' generate stops where tlm does. Export writes tokenizer.json +
tokenizer_config.json for the tokenizers that are Hugging Face `tokenizers` underneath (bpe, gpt2, hf) and for the
byte tokenizer (a byte-level BPE with no merges, ids = byte values); other kinds (char, llama2c, sentencepiece) are
exported as weights and config only, with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConversionError
from ..llama_tokenizers import SentencePieceTokenizer
from ..tokenizers import HFFileTokenizer, Tokenizer

log = logging.getLogger(__name__)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path` (`what` names it in the one-line error when it is unreadable or not an object)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {what} {path} ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} {path} does not hold a JSON object")
    return d


def model_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json; read first by import, so a wrong path (a weights file, a run) is named as such."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json); convert takes a folder "
                              "saved with save_pretrained, or a llama2.c .bin file")
    return read_json(folder / "config.json", "model config")


def special_ids(tokenizer: Tokenizer | None) -> dict[str, Any]:
    """bos_token_id and eos_token_id as config.json and generation_config.json spell them: eos_token_id is every one
    of the tokenizer's stop_ids, a list when there are several, so that transformers' generate stops where tlm does."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None}
    eot, bos, stops = tokenizer.eot_id, tokenizer.bos_id, list(tokenizer.stop_ids)
    return {"bos_token_id": bos if bos is not None else eot,
            "eos_token_id": stops if len(stops) > 1 else stops[0] if stops else None}


def _special(value: Any) -> str | None:
    """A token named in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(config: dict[str, Any]) -> list[int]:
    """The end-of-sequence ids a config.json or generation_config.json lists: its eos_token_id, one int or a list
    (Llama 3.1's [<|end_of_text|>, <|eom_id|>, <|eot_id|>]), which transformers' generate stops at each of."""
    ids = config.get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return [i for i in ids if type(i) is int]


PROBE = "The quick brown fox jumps over the lazy dog."


def _check_encodes(tok: Tokenizer, path: Path) -> Tokenizer:
    """`tok`, once it is seen to encode a plain English sentence into tokens that decode back to letters. A tokenizer
    file can read fine and still be broken: transformers 5 saves one built from GPT-2's vocab files as a 1-token
    vocabulary that encodes every text to nothing, which would import, train on empty data and sample nothing."""
    ids = tok.encode_continuation(PROBE)
    if not any(ch.isalpha() for ch in tok.decode(ids)):
        raise ConversionError(f"{path} ({tok.vocab_size} tokens) encodes {PROBE!r} to {ids[:8]}, which decodes to "
                              "no letters: the tokenizer is broken; save it again with AutoTokenizer."
                              "from_pretrained(<the original model>).save_pretrained(<folder>)")
    return tok


def load_hf_tokenizer(folder: str | Path) -> HFFileTokenizer | SentencePieceTokenizer:
    """The folder's tokenizer.json, with EOS/BOS from tokenizer_config.json (or config.json's ids); failing that, its
    SentencePiece tokenizer.model (older Llama/Mistral folders), ending samples at config.json's eos_token_id.
    Samples end at every end-of-sequence id the folder names, as transformers' generate does: tokenizer_config.json's
    eos_token (or else config.json's first eos_token_id) is eot_id, the document separator; the other ids of
    config.json's and generation_config.json's eos_token_id are the tokenizer's further stop_ids."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    mc = model_config(folder)
    gen = folder / "generation_config.json"
    eos_ids = _eos_ids(mc) + (_eos_ids(read_json(gen, "generation config")) if gen.exists() else [])
    if not path.exists():
        if (folder / "tokenizer.model").exists():
            eot = next(iter(_eos_ids(mc)), None)
            stop = [i for i in dict.fromkeys(eos_ids) if i != eot]
            return _check_encodes(SentencePieceTokenizer.from_file(folder / "tokenizer.model", eot, stop),
                                  folder / "tokenizer.model")
        raise ConversionError(f"{folder} has neither tokenizer.json nor tokenizer.model; tlm imports a model together "
                              "with its tokenizer: save it with AutoTokenizer.save_pretrained")
    tok = _check_encodes(HFFileTokenizer.from_file(path), path)
    tc = read_json(folder / "tokenizer_config.json", "tokenizer config") \
        if (folder / "tokenizer_config.json").exists() else {}

    def name(token: Any, ids: list[int]) -> str | None:
        """tokenizer_config.json's token, or else that of the first of config.json's ids, if the vocabulary has it."""
        token = _special(token)
        if token is None and ids:
            token = tok.hf.id_to_token(ids[0])
        return token if token is not None and tok.hf.token_to_id(token) is not None else None

    # BOS is kept only when the tokenizer's post-processor adds it itself (Llama): generation then prepends it to
    # prompts as transformers does. GPT-2 names <|endoftext|> as its BOS but never adds it, so neither does tlm.
    bos_id = mc.get("bos_token_id")
    bos = name(tc.get("bos_token"), [bos_id] if isinstance(bos_id, int) else [])
    if bos is not None and tok.hf.encode("a").ids[:1] != [tok.hf.token_to_id(bos)]:
        bos = None
    eot = name(tc.get("eos_token"), _eos_ids(mc))
    # an id past the tokenizer's vocabulary (a row of a padded embedding table) is never drawn, and has no name
    stop = [t for t in dict.fromkeys(name(None, [i]) for i in eos_ids) if t not in (None, eot)]
    return HFFileTokenizer(tok.hf, eot, bos, stop)


def _byte_tokenizer_json() -> str:
    """Our byte tokenizer as a HF byte-level BPE with no merges: byte b's token (GPT-2's byte→unicode map) has id b."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    hf = HFTokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf.to_str()


def write_tokenizer(tok: Tokenizer, folder: Path, block_size: int, family: str,
                    chat_template: str | None = None) -> bool:
    """tokenizer.json + tokenizer_config.json (with the chat template, if any) for AutoTokenizer; False (and a
    warning) when the kind has no HF form."""
    if family == "qwen2" and tok.kind in ("bpe", "gpt2"):
        log.warning("transformers' AutoTokenizer gives model_type qwen2 Qwen2's own pre-tokenizer, which this %s "
                    "tokenizer does not use: load the export with PreTrainedTokenizerFast.from_pretrained", tok.kind)
    if tok.kind == "byte":
        text = _byte_tokenizer_json()
    elif hasattr(tok, "hf"):
        text = tok.hf.to_str()
    else:
        log.warning("the %s tokenizer has no Hugging Face tokenizer.json form: exported weights and config only; "
                    "AutoTokenizer will not load the export", tok.kind)
        return False
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                           "clean_up_tokenization_spaces": False}
    eot = tok.eot_id
    if eot is not None and hasattr(tok, "hf"):
        cfg["eos_token"] = tok.hf.id_to_token(eot)
    bos = tok.bos_id
    if bos is not None:
        cfg["bos_token"] = tok.hf.id_to_token(bos)
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return True
