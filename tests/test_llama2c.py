"""llama2.c import: tokenizers against the SentencePiece library, and imported models against a numpy llama2.c forward.

Everything here is built by the tests (a SentencePiece model trained on a small text, random-weight .bin files in both
formats); nothing is read from ../shared. The real stories260K checkpoint is checked by benchmarks/stories260k_check.py.
"""

from __future__ import annotations

import errno
import io
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_lm import checkpoint, data, load_run
from transformer_lm.errors import CheckpointError, RunExistsError, TokenizerError
from transformer_lm.generate import generate
from transformer_lm.interop.llama2c import MAGIC, import_llama2c, load_llama2c, read_header
from transformer_lm.llama_tokenizers import Llama2cTokenizer, SentencePieceTokenizer
from transformer_lm.tokenizers import HFFileTokenizer, load_tokenizer, save_tokenizer

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog Max.\n"
    "One day, Lily saw a big red ball under a tree. \"Can I play with it?\" she asked her mom. Her mom said yes!\n"
    "Tom and Sue were friends. They liked to build towers of 12 blocks, then 345 more, and laugh when they fell.\n"
    "The sun was warm, the sky was blue, and the birds sang songs about apples, bees, clouds and daisies.\n"
)
TEXTS = [
    "Once upon a time",
    "Lily and Max played in the park until the sun went down.",
    "  two leading spaces,  double  spaces   and a trailing one ",
    "Numbers: 0 12 345 6789; punctuation!? (yes) [no] {maybe} -- 'quote' \"double\"",
    "Non-ASCII falls back to bytes: naïve café, Grüße, 日本語, emoji 😀👍🏽, Ω≈ç√",
    "tabs\tand\nnew\n\nlines\r\n",
    "x",
    "",
    "zzzz qqqq wwww unseen-ish words: xylophone, quizzical, jukebox",
]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    """A byte-fallback BPE SentencePiece model trained with llama2.c's train_vocab settings."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STORY.splitlines() * 20), model_writer=out, vocab_size=480, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        max_sentence_length=4096, minloglevel=2,
    )
    return out.getvalue()


def write_tokenizer_bin(path: Path, pieces: list[str], scores: list[float]) -> None:
    """llama2.c's tokenizer.bin, as its tokenizer.py exports it."""
    data = [p.encode("utf-8") for p in pieces]
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(b) for b in data)))
        for b, s in zip(data, scores):
            f.write(struct.pack("<fI", s, len(b)))
            f.write(b)


def export_tokenizer_bin(sp_proto: bytes, path: Path) -> None:
    """llama2.c's tokenizer.py: ▁ becomes a space, BOS/EOS become '\\n<s>\\n' / '\\n</s>\\n'."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_proto)
    pieces, scores = [], []
    for i in range(sp.get_piece_size()):
        t = sp.id_to_piece(i)
        t = "\n<s>\n" if i == sp.bos_id() else "\n</s>\n" if i == sp.eos_id() else t
        pieces.append(t.replace("▁", " "))
        scores.append(sp.get_score(i))
    write_tokenizer_bin(path, pieces, scores)


def test_sentencepiece_tokenizer_matches_library(sp_model: bytes, tmp_path: Path) -> None:
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_proto=sp_model)
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    tok = SentencePieceTokenizer.from_file(tmp_path / "tokenizer.model")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")  # the run folder's copy is self-contained
    assert (loaded.vocab_size, loaded.eot_id) == (ref.get_piece_size(), 1)
    for text in TEXTS:
        ids = loaded.encode(text)
        assert ids == ref.encode(text), text
        assert loaded.decode(ids) == ref.decode(ids)


def test_tokenizer_bin_encodes_like_sentencepiece(sp_model: bytes, tmp_path: Path) -> None:
    """Our port of run.c's encode (greedy best-score merges) gives SentencePiece's ids when the model does not
    normalize text (llama2.c's settings), including byte fallback for characters outside the vocabulary."""
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_proto=sp_model)
    export_tokenizer_bin(sp_model, tmp_path / "tokenizer.bin")
    tok = Llama2cTokenizer.from_bin(tmp_path / "tokenizer.bin")
    assert tok.vocab_size == ref.get_piece_size() and tok.eot_id == 1
    texts = [*TEXTS, STORY, STORY.replace(" ", "  ")]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text
    for text in texts:  # decoding after BOS: run.c's rules give SentencePiece's text (bytes fallback included)
        ids = ref.encode(text)
        assert tok.decode([1, *ids]) == ref.decode(ids), text
    space = ref.piece_to_id("<0x20>")  # a byte piece a model can sample right after BOS keeps its space
    for ids in ([space, *ref.encode("Once")], [space, space]):
        assert tok.decode([1, *ids]) == ref.decode(ids)
    rebuilt = load_tokenizer(_saved(tok, tmp_path))
    assert rebuilt.encode(STORY) == tok.encode(STORY)


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.bin"])
def test_streamed_text_is_the_decoded_continuation(kind: str, sp_model: bytes, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """These tokenizers drop the leading space of a text's first piece and of a piece after BOS, so decoding the
    new ids alone lost the space between a prompt and "▁there", and an empty prompt's sample began with a space
    (upstream llama2.c's begins "Once upon a time"). A sample is prompt + the pieces: the decoded whole."""
    import sentencepiece as spm

    from transformer_lm import generate as gen
    from transformer_lm.config import SampleConfig

    ref = spm.SentencePieceProcessor(model_proto=sp_model)
    if kind == "sentencepiece":
        (tmp_path / "tokenizer.model").write_bytes(sp_model)
        tok = SentencePieceTokenizer.from_file(tmp_path / "tokenizer.model")
    else:
        export_tokenizer_bin(sp_model, tmp_path / "tokenizer.bin")
        tok = Llama2cTokenizer.from_bin(tmp_path / "tokenizer.bin")
    for prompt, story in (("Once upon a time", STORY), ("", STORY), ("naïve café", " Grüße, 日本語 😀 and more")):
        ids = ref.encode(prompt + story if prompt else story)
        head = len(ref.encode(prompt)) if prompt else 0
        assert ids[:head] == ref.encode(prompt)  # the prompt's ids start the whole text's
        new = ids[head:]
        monkeypatch.setattr(gen, "generate", lambda *a, new=new, **kw: iter(new))
        pieces = list(gen.stream_text(None, tok, prompt, SampleConfig(max_new_tokens=len(new), greedy=True)))
        assert prompt + "".join(pieces) == ref.decode(ids), (kind, prompt)


@pytest.fixture(scope="module")
def exported(sp_model: bytes, tmp_path_factory: pytest.TempPathFactory) -> tuple[Llama2cTokenizer, object]:
    """(our tokenizer.bin tokenizer, the SentencePiece processor) for the same model."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("exported") / "tokenizer.bin"
    export_tokenizer_bin(sp_model, path)
    return Llama2cTokenizer.from_bin(path), spm.SentencePieceProcessor(model_proto=sp_model)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=sorted(set(STORY + "  éü日😀\t\r~^")), max_size=80))
def test_tokenizer_bin_encodes_like_sentencepiece_on_random_text(exported: tuple, text: str) -> None:
    ours, ref = exported
    assert ours.encode(text) == ref.encode(text)


def _sp_hf_tokenizer() -> HFFileTokenizer:
    """A Llama 2-style tokenizer.json: Prepend('▁') and spaces as '▁' in the normalizer, BPE without a pre-tokenizer
    (trained on lines, so no merge holds a line break), and '<s> $A' as the post-processor."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, normalizers, processors, trainers

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.train_from_iterator(STORY.splitlines() * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n"], show_progress=False))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    return HFFileTokenizer(hf, eot="</s>", bos="<s>")


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.bin", "tokenizer.json"])
def test_chunked_preparation_encodes_as_the_whole_text(kind: str, sp_model: bytes, exported: tuple,
                                                       tmp_path: Path) -> None:
    """`prepare` encodes a long file in ~1 MiB chunks; each chunk after the first got the tokenizer's start of text
    again (SentencePiece's dummy-prefix '▁', a tokenizer.json's BOS): one stray id per chunk. Now each split's ids
    are those of encoding its text whole."""
    tok = {"sentencepiece": lambda: SentencePieceTokenizer(sp_model), "tokenizer.bin": lambda: exported[0],
           "tokenizer.json": _sp_hf_tokenizer}[kind]()
    text = STORY * 6
    (tmp_path / "story.txt").write_text(text)
    with mock.patch.object(data, "CHUNK_CHARS", 250):  # half a chunk holds a line break: chunks start at one
        chunks = list(data._file_chunks(tmp_path / "story.txt"))
        assert len(chunks) > 5 and all(c.startswith("\n") for c in chunks[1:])
        whole, _ = data.encode_sources([tmp_path / "story.txt"], tok)
        manifest = data.prepare([tmp_path / "story.txt"], tmp_path / "prepared", tok, val_fraction=0.3, workers=1)
    assert whole.tolist() == tok.encode(text)
    assert (tok.encode(text)[0] == tok.bos_id) is (kind == "tokenizer.json")  # the one BOS, at the start
    prepared, n = data.load_prepared(tmp_path / "prepared"), manifest["train_chars"]
    assert prepared.train.tolist() == tok.encode(text[:n]) and prepared.val.tolist() == tok.encode(text[n:])


def _saved(tok: Llama2cTokenizer, folder: Path) -> Path:
    save_tokenizer(tok, folder / "saved.json")
    return folder / "saved.json"


def test_tokenizer_bin_decoding_follows_run_c() -> None:
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n", *(f"<0x{b:02X}>" for b in range(256)), " Once", "é", " upon"]
    tok = Llama2cTokenizer(pieces, [0.0] * len(pieces))
    once, e_acute, upon = 259, 260, 261
    assert tok.decode([1, once, upon]) == "Once upon"  # the space after BOS is stripped
    assert tok.decode([once, upon]) == " Once upon"  # ... and only there
    assert tok.decode([1, 3 + 0x20, once]) == "  Once"  # ... and from a piece's text, not a <0x20>'s byte (was " Once")
    assert tok.decode([3 + 0xC3, 3 + 0xA9, e_acute]) == "éé"  # <0xXX> pieces are raw bytes
    assert tok.encode("é😀") == [3 + 0x20, e_acute, *(3 + b for b in "😀".encode())]


def test_tokenizer_bin_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.bin").write_bytes(struct.pack("<i", 4) + struct.pack("<fi", 0.0, 99) + b"abc")
    with pytest.raises(TokenizerError, match="not a llama2.c tokenizer.bin"):
        Llama2cTokenizer.from_bin(tmp_path / "bad.bin")


# ----------------------------------------------------------------------------------------------------------------------
# Models: a numpy llama2.c forward pass, written from run.c


DIMS = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=262, seq_len=24)


def random_weights(shared: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, h, L, nh, nkv, v, T = (DIMS[k] for k in DIMS)
    hs, kv = d // nh, d // nh * nkv

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = dict(token_embedding=r(v, d), rms_att=1 + r(L, d), wq=r(L, d, d), wk=r(L, kv, d), wv=r(L, kv, d),
             wo=r(L, d, d), rms_ffn=1 + r(L, d), w1=r(L, h, d), w2=r(L, d, h), w3=r(L, h, d), rms_final=1 + r(d))
    angles = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hs, 2) / hs)
    w["freq_cis_real"], w["freq_cis_imag"] = np.cos(angles), np.sin(angles)
    w["wcls"] = w["token_embedding"] if shared else r(v, d)
    return w


def write_bin(path: Path, w: dict[str, np.ndarray], version: int, shared: bool) -> None:
    """llama2.c's export.py: legacy_export (version 0) or version1_export."""
    p = DIMS
    params = [p["dim"], p["hidden_dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], p["vocab_size"], p["seq_len"]]
    with open(path, "wb") as f:
        if version == 0:
            params[5] = params[5] if shared else -params[5]
            f.write(struct.pack("<7i", *params))
            order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final",
                     "freq_cis_real", "freq_cis_imag"]
        else:
            f.write(struct.pack("<Ii", MAGIC, version) + struct.pack("<7i", *params) + struct.pack("B", shared))
            f.write(b"\0" * (256 - f.tell()))
            order = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
        for name in order + ([] if shared else ["wcls"]):
            f.write(np.asarray(w[name], dtype="<f4").tobytes())


def llama2c_forward(w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits (T, vocab) as run.c computes them, position by position semantics in one causal pass, float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    d, nh, nkv = DIMS["dim"], DIMS["n_heads"], DIMS["n_kv_heads"]
    hs, T = d // nh, len(tokens)

    def rmsnorm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x: np.ndarray) -> np.ndarray:  # (T, heads*hs): rotate adjacent pairs (2i, 2i+1) of each head
        x = x.reshape(T, -1, hs // 2, 2)
        freq = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
        ang = np.arange(T)[:, None, None] * freq[None, None, :]
        c, s = np.cos(ang), np.sin(ang)
        out = np.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], axis=-1)
        return out.reshape(T, -1)

    x = w["token_embedding"][tokens]
    for layer in range(DIMS["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q, k, v = rope(xb @ w["wq"][layer].T), rope(xb @ w["wk"][layer].T), xb @ w["wv"][layer].T
        out = np.zeros((T, d))
        for h in range(nh):
            kh = h // (nh // nkv)
            qh, kk, vv = q[:, h * hs:(h + 1) * hs], k[:, kh * hs:(kh + 1) * hs], v[:, kh * hs:(kh + 1) * hs]
            att = qh @ kk.T / np.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
            att = np.exp(att - att.max(-1, keepdims=True))
            out[:, h * hs:(h + 1) * hs] = (att / att.sum(-1, keepdims=True)) @ vv
        x = x + out @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        h1, h3 = xb @ w["w1"][layer].T, xb @ w["w3"][layer].T
        x = x + (h1 / (1 + np.exp(-h1)) * h3) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


@pytest.fixture
def tokenizer_bin(tmp_path: Path) -> Path:
    """A tokenizer.bin sized to DIMS' vocabulary: specials, 256 bytes, 3 pieces."""
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n", *(f"<0x{b:02X}>" for b in range(256)), " ", "a", " a"]
    assert len(pieces) == DIMS["vocab_size"]
    write_tokenizer_bin(tmp_path / "tok.bin", pieces, [0.0] * 259 + [-1.0, -2.0, -3.0])
    return tmp_path / "tok.bin"


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_import_matches_numpy_llama2c(tmp_path: Path, tokenizer_bin: Path, version: int, shared: bool) -> None:
    w = random_weights(shared)
    write_bin(tmp_path / "model.bin", w, version, shared)
    header = read_header(tmp_path / "model.bin")
    assert (header.version, header.shared_classifier, header.vocab_size) == (version, shared, DIMS["vocab_size"])

    run = load_run(import_llama2c(tmp_path / "model.bin", tmp_path / "run", tokenizer_bin), device="cpu")
    cfg = run.model.config
    assert (cfg.n_embd, cfg.d_ff, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.block_size) == \
        tuple(DIMS.values())
    assert cfg.tie_embeddings == shared and run.tokenizer.kind == "llama2c" and run.step == 0
    assert run.config["source"]["format"] == "llama2c"

    tokens = [1, *np.random.default_rng(1).integers(0, DIMS["vocab_size"], DIMS["seq_len"] - 1).tolist()]
    with torch.no_grad():
        ours = run.model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(ours, llama2c_forward(w, tokens), atol=1e-4, rtol=0)
    # greedy decoding with the KV cache follows the same logits
    steps = list(generate(run.model, tokens[:3], 5, temperature=0))
    assert steps[0] == int(llama2c_forward(w, tokens[:3])[-1].argmax())


def test_import_errors(tmp_path: Path, tokenizer_bin: Path) -> None:
    write_bin(tmp_path / "model.bin", random_weights(True), 1, True)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama2c(tmp_path / "short.bin")
    (tmp_path / "v2.bin").write_bytes(data[:4] + struct.pack("<i", 2) + data[8:])
    with pytest.raises(CheckpointError, match="version 2"):
        load_llama2c(tmp_path / "v2.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x07" * 100)
    with pytest.raises(CheckpointError):
        load_llama2c(tmp_path / "junk.bin")
    with pytest.raises(TokenizerError, match="no tokenizer given"):
        import_llama2c(tmp_path / "model.bin", tmp_path / "run")
    wrong = tmp_path / "wrong.bin"
    write_tokenizer_bin(wrong, ["<unk>", "\n<s>\n", "\n</s>\n", *(f"<0x{b:02X}>" for b in range(256))], [0.0] * 259)
    with pytest.raises(CheckpointError, match="vocab_size"):
        import_llama2c(tmp_path / "model.bin", tmp_path / "run", wrong)
    import_llama2c(tmp_path / "model.bin", tmp_path / "run", tokenizer_bin)
    with pytest.raises(RunExistsError):
        import_llama2c(tmp_path / "model.bin", tmp_path / "run", tokenizer_bin)
    import_llama2c(tmp_path / "model.bin", tmp_path / "run", tokenizer_bin, overwrite=True)
    assert load_run(tmp_path / "run", device="cpu").step == 0
    (tmp_path / "mine").mkdir()  # a folder tlm did not write is never replaced, nor one holding the input
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for out, match in ((tmp_path / "mine", "no run tlm wrote"), (tmp_path, "which this command reads")):
        with pytest.raises(RunExistsError, match=match):
            import_llama2c(tmp_path / "model.bin", out, tokenizer_bin, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_a_failed_overwrite_keeps_the_previous_run(tmp_path: Path, tokenizer_bin: Path, monkeypatch) -> None:
    """--overwrite emptied the old run before writing the new one: a full disk part-way left an empty folder."""
    write_bin(tmp_path / "model.bin", random_weights(True), 1, True)
    run = import_llama2c(tmp_path / "model.bin", tmp_path / "run", tokenizer_bin)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_tensors", full_disk)
    with pytest.raises(OSError, match="No space"):
        import_llama2c(tmp_path / "model.bin", run, tokenizer_bin, overwrite=True)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
