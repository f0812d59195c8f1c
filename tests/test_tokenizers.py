"""Tokenizers: exact round trips, save/load, GPT-2 parity with a naive reference BPE and (when the files are
available) with tiktoken, and the typed errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_lm.errors import ConfigError, DataError, TokenizerError
from transformer_lm.tokenizers import (
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)

EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:30 and we'll be late!\n",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va très bien, merci.\n",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Größe, Äpfel.\n",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.\n",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. 我能吞下玻璃而不伤身体。私はガラスを食べられます。\n",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني. 🦊🐶 emoji 👍🏽 and tabs\tand   spaces  \n\n",
    "def f(x):\n    return x ** 2  # comment\n\n    \n" + EOT,
]
VARIED = [
    "",
    "Hello world",
    " Hello  world ",
    "   leading and trailing   ",
    "\n\n\tmixed \r\n whitespace \u00a0 nbsp \u3000 ideographic space\n",
    "it's they're we've I'm you'll he'd IT'S",
    "numbers 1234567890 ١٢٣ and 3.14159",
    "aaaaaaa aaa aa a the thethe hello hellohello sing singing",
    "é e\u0301 café 世界 世世 🦊",
    f"two{EOT}documents{EOT}{EOT} and a partial <|endoftext",
    "\x00\x01\x1c\x1f\x7f\x85 controls",
    *CORPUS,
]
PARAGRAPH = (
    "Language models are trained to predict the next token. In 2019, OpenAI released GPT-2, a 1.5B-parameter "
    "Transformer trained on WebText — 40GB of text from 8 million web pages. Its byte-level BPE vocabulary "
    '(50,257 tokens) can encode any string, so there\'s no <unk> token; e.g. "naïve", "Zürich" and "東京" '
    "all work.\n\n    Indented code: for i in range(10): print(i)  \n"
)

UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
NEAR_MERGES = st.text(st.sampled_from(list(" \n\taheltingsr'123é世") + ["\u00a0"]), max_size=40)
TEXT = st.lists(st.one_of(UNICODE, NEAR_MERGES, st.just(EOT)), max_size=6).map("".join)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which its files use to spell tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


B2U = bytes_to_unicode()
U2B = {u: b for b, u in B2U.items()}


def spell(b: bytes) -> str:
    return "".join(B2U[x] for x in b)


def token_bytes(tok: Tokenizer) -> dict[int, bytes]:
    """Bytes of every id of a byte-level HF-backed tokenizer, read from its saved JSON."""
    d = tok.to_dict()["tokenizer"]
    out = {i: bytes(U2B[c] for c in s) for s, i in d["model"]["vocab"].items()}
    out.update({t["id"]: t["content"].encode() for t in d["added_tokens"]})
    return out


# Small GPT-2 style files: the 256 byte symbols in GPT-2's order, merges that chain and overlap, then EOT.
SMALL_MERGES = [
    (b"h", b"e"),
    (b" ", b"t"),
    (b" t", b"he"),
    (b"i", b"n"),
    (b"in", b"g"),
    (b" ", b"a"),
    (b"e", b"r"),
    (b"a", b"a"),
    (b"aa", b"a"),
    (b"aa", b"aa"),
    (b" ", b" "),
    (b"\n", b"\n"),
    (b"\xc3", b"\xa9"),
    (b"1", b"2"),
    (b"12", b"3"),
    (b"'", b"s"),
    (b"l", b"l"),
    (b"he", b"ll"),
    (b"hell", b"o"),
    (b"\xe4", b"\xb8"),
    (b"\xe4\xb8", b"\x96"),
    (b" ", b"\xe4\xb8\x96"),
    (b"t", b"h"),
    (b"s", b"ing"),
]


def write_small_gpt2_files(folder: Path) -> None:
    encoder = {B2U[b]: i for i, b in enumerate(B2U)}
    for a, b in SMALL_MERGES:
        encoder[spell(a + b)] = len(encoder)
    encoder[EOT] = len(encoder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{spell(a)} {spell(b)}" for a, b in SMALL_MERGES)]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")


def reference_gpt2_encode(text: str, folder: Path) -> list[int]:
    """GPT-2's original encoder.py algorithm: split off EOT, regex pre-tokenize, merge the lowest-rank pair."""
    regex = pytest.importorskip("regex")  # installed with tiktoken and transformers; `re` lacks \p{L}
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    ranks = {tuple(line.split()): r for r, line in enumerate(lines)}
    ids: list[int] = []
    for part in regex.split(f"({regex.escape(EOT)})", text):
        if part == EOT:
            ids.append(encoder[EOT])
            continue
        for piece in regex.findall(GPT2_PATTERN, part):
            word = [B2U[b] for b in piece.encode()]
            while len(word) > 1:
                pair = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
                if pair not in ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            ids.extend(encoder[t] for t in word)
    return ids


@pytest.fixture(scope="module")
def small_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2-small")
    write_small_gpt2_files(folder)
    return folder


@pytest.fixture(scope="module")
def toks(small_gpt2_dir: Path) -> dict[str, Tokenizer]:
    """One tokenizer of every kind; char is trained on the corpus plus every test text it will see."""
    return {
        "byte": build_tokenizer("byte"),
        "char": build_tokenizer("char", iter([*CORPUS, *VARIED, PARAGRAPH])),
        "bpe": build_tokenizer("bpe", iter(CORPUS * 3), vocab_size=600),
        "gpt2": build_tokenizer("gpt2", gpt2_dir=small_gpt2_dir),
    }


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2"])
@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_byte_level_kinds_round_trip_any_text(toks: dict[str, Tokenizer], kind: str, text: str) -> None:
    tok = toks[kind]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_char_round_trips_text_in_its_vocabulary(text: str) -> None:
    tok = build_tokenizer("char", iter([CORPUS[0], text]))
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(CORPUS[0] + text))


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_decode_of_any_ids_replaces_invalid_utf8(toks: dict[str, Tokenizer], kind: str, data) -> None:
    tok = toks[kind]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    table = token_bytes(tok)
    assert tok.decode(ids) == b"".join(table[i] for i in ids).decode("utf-8", errors="replace")


def test_byte_decode_replaces_invalid_utf8(toks: dict[str, Tokenizer]) -> None:
    assert toks["byte"].decode([104, 0xC3, 105, 0xE4, 0xB8]) == "h\ufffdi\ufffd"


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_save_load_and_dict_round_trip(toks: dict[str, Tokenizer], kind: str, tmp_path: Path) -> None:
    tok = toks[kind]
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left behind
    for other in (load_tokenizer(path), tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))):
        assert type(other) is type(tok) and other.kind == kind
        assert (other.vocab_size, other.eot_id) == (tok.vocab_size, tok.eot_id)
        assert other.to_dict() == tok.to_dict()
        for text in [*VARIED, PARAGRAPH]:
            assert other.encode(text) == tok.encode(text)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_encode_batch_equals_encode(toks: dict[str, Tokenizer], kind: str) -> None:
    tok = toks[kind]
    assert tok.encode_batch(VARIED) == [tok.encode(t) for t in VARIED]


def test_eot_ids(toks: dict[str, Tokenizer]) -> None:
    assert toks["byte"].eot_id is None and toks["char"].eot_id is None
    for kind in ("bpe", "gpt2"):
        tok = toks[kind]
        assert tok.eot_id is not None and tok.encode(f"a{EOT}b")[1] == tok.eot_id
        assert tok.decode([tok.eot_id]) == EOT
    for tok in toks.values():  # a sample of a tokenizer built here ends at its end-of-text id alone
        assert tok.stop_ids == ((tok.eot_id,) if tok.eot_id is not None else ())


def test_imported_stop_ids_survive_save_and_load(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    """An imported tokenizer's further end-of-sequence tokens (Llama 3's <|eom_id|>, <|eot_id|>) are kept in the run
    folder's tokenizer.json; one saved before they were kept loads with its end-of-text id alone."""
    from transformer_lm.tokenizers import HFFileTokenizer

    hf = BPETokenizer.train(CORPUS, vocab_size=300).hf
    hf.add_special_tokens(["<|eom_id|>", "<|eot_id|>"])
    tok = HFFileTokenizer(hf, EOT, stop=["<|eot_id|>", "<|eom_id|>"])
    ids = [hf.token_to_id(t) for t in (EOT, "<|eot_id|>", "<|eom_id|>")]
    assert tok.eot_id == ids[0] and tok.stop_ids == tuple(ids)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").stop_ids == tuple(ids)
    old = {k: v for k, v in tok.to_dict().items() if k != "stop"}
    assert tokenizer_from_dict(old).stop_ids == (ids[0],)
    with pytest.raises(TokenizerError, match="not in the tokenizer's vocabulary"):
        HFFileTokenizer(hf, EOT, stop=["<|im_end|>"])
    with pytest.raises(TokenizerError, match="'stop' is not a list"):
        tokenizer_from_dict({**old, "stop": "<|eot_id|>"})


def test_bpe_vocab_covers_bytes_and_respects_size(toks: dict[str, Tokenizer]) -> None:
    tok = toks["bpe"]
    assert tok.vocab_size == 600
    assert len(set(token_bytes(tok).values()) & {bytes([b]) for b in range(256)}) == 256
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) // 2  # it learned merges


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_gpt2_loader_equals_reference_bpe(toks: dict[str, Tokenizer], small_gpt2_dir: Path, text: str) -> None:
    assert toks["gpt2"].encode(text) == reference_gpt2_encode(text, small_gpt2_dir)


def test_gpt2_loader_equals_reference_bpe_on_varied_text(toks: dict[str, Tokenizer], small_gpt2_dir: Path):
    tok = toks["gpt2"]
    for text in [*VARIED, PARAGRAPH]:
        assert tok.encode(text) == reference_gpt2_encode(text, small_gpt2_dir), text
    # " the": h+e, then " "+t, then " t"+"he".  " aaaaa": " "+a first, then a+a twice left to right, then aa+aa.
    merged = {a + b: 256 + r for r, (a, b) in enumerate(SMALL_MERGES)}
    assert tok.encode(" the aaaaa") == [merged[b" the"], merged[b" a"], merged[b"aaaa"]]


def test_bpe_trained_on_one_string_learns_its_merges() -> None:
    """A string passed as the texts was iterated character by character: a BPE of the bytes alone (257 ids)."""
    text = "".join(CORPUS) * 3
    one, listed = build_tokenizer("bpe", text, vocab_size=400), build_tokenizer("bpe", [text], vocab_size=400)
    assert one.vocab_size == listed.vocab_size == 400
    assert one.encode(PARAGRAPH) == listed.encode(PARAGRAPH)


def test_bpe_spends_no_ids_on_the_document_separator() -> None:
    """Documents joined with '<|endoftext|>': the trainer learned the separator's pieces ('<|', 'endoftext', '|>',
    ' <|'), ids that encoding never yields there as the separator encodes to its own id. Trained on the documents
    alone, the vocabulary is the same as with the separator."""
    docs = [c * 2 for c in CORPUS[:-1]] * 3
    joined = build_tokenizer("bpe", [EOT.join(docs)], vocab_size=1000)
    apart = build_tokenizer("bpe", docs, vocab_size=1000)
    assert joined.to_dict() == apart.to_dict()
    pieces = {b for i, b in token_bytes(joined).items() if i != joined.eot_id and (b"<|" in b or b"oftext" in b)}
    assert not pieces  # the documents hold neither: only the separator taught them


def test_vocab_size_is_ignored_by_kinds_whose_size_is_fixed(small_gpt2_dir: Path) -> None:
    assert build_tokenizer("byte", vocab_size=4096).vocab_size == 256
    assert build_tokenizer("char", ["ab"], vocab_size=4096).vocab_size == 2
    assert build_tokenizer("gpt2", gpt2_dir=small_gpt2_dir, vocab_size=4096).vocab_size == 256 + len(SMALL_MERGES) + 1


def test_char_rejects_unseen_character_with_position() -> None:
    tok = build_tokenizer("char", (t for t in ["abc", "cab "]))
    assert tok.vocab_size == 4
    with pytest.raises(TokenizerError, match=r"'z' at position 3.*byte tokenizer"):
        tok.encode("ab zc")


def test_bad_arguments_raise_config_error(small_gpt2_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tokenizer kind 'wordpiece'"):
        build_tokenizer("wordpiece")
    with pytest.raises(ConfigError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "wordpiece"})
    with pytest.raises(ConfigError, match=">= 257"):
        build_tokenizer("bpe", CORPUS, vocab_size=256)
    with pytest.raises(ConfigError, match="pass texts"):
        build_tokenizer("char")
    with pytest.raises(DataError, match="no characters"):
        build_tokenizer("char", ["", ""])
    with pytest.raises(ConfigError, match="gpt2_dir"):
        build_tokenizer("gpt2")


def test_bad_files_raise_tokenizer_error(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    path = tmp_path / "tokenizer.json"
    save_tokenizer(toks["bpe"], path)
    path.write_text(path.read_text()[:1000])
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        load_tokenizer(path)
    for bad in ({"kind": "wordpiece"}, {"kind": "bpe", "tokenizer": {"model": 3}}, {"kind": "char"}, [1]):
        path.write_text(json.dumps(bad))
        with pytest.raises(TokenizerError, match="tokenizer.json"):
            load_tokenizer(path)
    with pytest.raises(TokenizerError, match="nowhere"):
        build_tokenizer("gpt2", gpt2_dir=tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="outside"):
        toks["gpt2"].decode([toks["gpt2"].vocab_size])
    with pytest.raises(TokenizerError, match="lone surrogate"):
        toks["bpe"].encode("a\ud800")


# The real GPT-2 files are not in the repository; point TLM_GPT2_BPE_DIR at a folder holding them.
GPT2_DIR = os.environ.get("TLM_GPT2_BPE_DIR")
needs_gpt2_files = pytest.mark.skipif(
    not (GPT2_DIR and (Path(GPT2_DIR) / "encoder.json").exists() and (Path(GPT2_DIR) / "vocab.bpe").exists()),
    reason="set TLM_GPT2_BPE_DIR to a folder with GPT-2's encoder.json and vocab.bpe",
)


@pytest.fixture(scope="module")
def real_gpt2() -> tuple[Tokenizer, object]:
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken

    folder = Path(GPT2_DIR)
    # tiktoken caches files by path under /tmp unless told not to; a stale cache would compare the wrong files.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    enc = tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})
    return build_tokenizer("gpt2", gpt2_dir=folder), enc


@needs_gpt2_files
def test_real_gpt2_known_ids_and_tiktoken_parity(real_gpt2) -> None:
    tok, enc = real_gpt2
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    for text in [*VARIED, PARAGRAPH, PARAGRAPH * 3]:
        assert tok.encode(text) == enc.encode(text, allowed_special="all"), text
        assert tok.decode(tok.encode(text)) == text


@needs_gpt2_files
@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_real_gpt2_tiktoken_parity_on_random_text(real_gpt2, text: str) -> None:
    tok, enc = real_gpt2
    assert tok.encode(text) == enc.encode(text, allowed_special="all")


def test_num_bytes_counts_the_text_and_not_the_separators():
    """What bits per byte divide by: the UTF-8 bytes of the ids' text; an end-of-text id stands for no text."""
    text = "naïve — 日本\n"
    byte = ByteTokenizer()
    assert byte.num_bytes(byte.encode(text)) == len(text.encode())
    assert byte.num_bytes(byte.encode("é")[:1]) == 1  # half a character is still one byte
    bpe = BPETokenizer.train([text * 20], vocab_size=300)
    ids = [*bpe.encode(text), bpe.eot_id, *bpe.encode(text)]
    assert bpe.num_bytes(ids) == 2 * len(text.encode())


def test_num_bytes_counts_no_bytes_for_an_imported_bos():
    """An imported tokenizer.json whose post-processor puts BOS first (Llama 3's template): bits per byte took the
    decoded '<|begin_of_text|>' (17 bytes) off the text's bytes, 3.4x too few bytes per token on a 24-byte text."""
    from tokenizers import processors

    from transformer_lm.evaluate import predicted_bytes_per_token
    from transformer_lm.tokenizers import HFFileTokenizer

    bos = "<|begin_of_text|>"
    hf = BPETokenizer.train(CORPUS, vocab_size=300).hf
    hf.add_special_tokens([bos])
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, hf.token_to_id(bos))])
    tok = HFFileTokenizer(hf, EOT, bos)
    text = "naïve — 日本\nhello there"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.decode(ids) == bos + text  # as `tokenizers` decodes it
    assert tok.num_bytes(ids) == len(text.encode())
    np = pytest.importorskip("numpy")
    assert predicted_bytes_per_token(tok, np.array(ids), len(text.encode())) == len(text.encode()) / (len(ids) - 1)


def test_an_imported_tokenizer_json_saved_with_truncation_and_padding_encodes_whole_texts(tmp_path: Path):
    """A tokenizer.json saved with truncation and padding on: every encode was cut at max_length and a batch padded
    with pad ids, where transformers' tokenizer (the model's reference) does neither unless a call asks."""
    transformers = pytest.importorskip("transformers")
    from transformer_lm.tokenizers import HFFileTokenizer

    hf = BPETokenizer.train(CORPUS, vocab_size=300).hf
    hf.enable_truncation(8)
    hf.enable_padding(pad_id=0, pad_token=EOT)
    hf.save(str(tmp_path / "tokenizer.json"))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    tok = HFFileTokenizer.from_file(tmp_path / "tokenizer.json")
    texts = ["hi", PARAGRAPH]
    assert tok.encode_batch(texts) == ref(texts)["input_ids"] == [tok.encode(t) for t in texts]
    assert tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH
    save_tokenizer(tok, tmp_path / "saved.json")
    assert load_tokenizer(tmp_path / "saved.json").encode(PARAGRAPH) == tok.encode(PARAGRAPH)
