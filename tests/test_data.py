"""Corpus preparation, loading and batching: ids equal a direct tokenization, splits follow nanoGPT's rule,
streaming and workers change nothing, failures leave no half-written folder, and sampling resumes exactly."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from transformer_lm import data
from transformer_lm.cli import main
from transformer_lm.data import default_corpus, is_prepared, load_prepared, prepare, read_sources, resolve_sources
from transformer_lm.errors import ConfigError, DataError, RunExistsError
from transformer_lm.tokenizers import EOT, ByteTokenizer, Tokenizer, build_tokenizer
from transformer_lm.windows import BatchSampler, conversation_chunks, iter_eval_batches

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "Ünïcödé — naïve café, 東京, emoji 🙂🙂.\n  indented line\r\nwindows line\n",
    "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n",
]


def write(folder: Path, texts: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:02d}.txt" for i in range(len(texts))]
    for p, t in zip(paths, texts, strict=True):
        p.write_bytes(t.encode("utf-8"))  # bytes, so '\r\n' survives as written
    return paths


def reference(texts: list[str], tok: Tokenizer, val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Tokenize each split's text directly: the split falls at character int(n * (1 - val_fraction)) of the
    concatenation, with '<|endoftext|>' (which the BPE kinds encode to eot_id) between files when there is one."""
    cut = int(sum(map(len, texts)) * (1 - val_fraction))
    sep = EOT if tok.eot_id is not None else ""
    train, val, pos = "", "", 0
    for i, t in enumerate(texts):
        k = min(max(cut - pos, 0), len(t))
        train, val = train + t[:k], val + t[k:]
        if i < len(texts) - 1:
            if pos + len(t) <= cut:
                train += sep
            else:
                val += sep
        pos += len(t)
    return tok.encode(train), tok.encode(val)


def ids(folder: Path, split: str) -> list[int]:
    return load_prepared(folder).__getattribute__(split).tolist()


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return build_tokenizer("bpe", (TEXTS + big_corpus()) * 5, vocab_size=500)


@pytest.mark.parametrize("kind", ["file", "folder", "glob", "list"])
def test_prepare_matches_direct_tokenization(tmp_path: Path, kind: str) -> None:
    texts = TEXTS if kind != "file" else ["".join(TEXTS)]
    paths = write(tmp_path / "corpus", texts)
    (tmp_path / "corpus" / ".hidden.txt").write_text("hidden")
    (tmp_path / "corpus" / "empty.txt").write_text("")
    (tmp_path / "corpus" / "blob.bin").write_bytes(b"\x00\xff" * 100)
    source = {"file": paths[0], "folder": tmp_path / "corpus", "glob": str(tmp_path / "**" / "0*.txt"),
              "list": [str(p) for p in paths]}[kind]
    files = resolve_sources(source)
    assert files == paths
    tok = build_tokenizer("char", read_sources(files))
    manifest = prepare(files, tmp_path / "out", tok)
    train, val = reference(texts, tok)
    assert ids(tmp_path / "out", "train") == train and ids(tmp_path / "out", "val") == val
    full = "".join(texts)
    n_train = int(len(full) * 0.9)  # nanoGPT's rule, in characters (the text has multi-byte ones)
    assert manifest["train_tokens"] == len(train) == n_train
    assert manifest["val_tokens"] == len(val) == len(full) - n_train
    assert manifest["train_bytes"] == len(full[:n_train].encode()) and manifest["val_bytes"] == len(
        full[n_train:].encode())
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"] == {"kind": "char", "vocab_size": tok.vocab_size}
    assert [s["bytes"] for s in manifest["sources"]] == [p.stat().st_size for p in paths]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert load_prepared(tmp_path / "out").tokenizer.to_dict() == tok.to_dict()


@pytest.mark.parametrize("kind", ["str", "path", "folder", "glob"])
def test_prepare_takes_one_source_as_tlm_prepare_does(tmp_path: Path, kind: str) -> None:
    """`prepare("book.txt", ...)` read the path as a list of one-letter file names (`cannot read data file /`),
    a Path was not iterable, and a folder or glob was refused, though the CLI takes them all."""
    texts = TEXTS if kind not in ("str", "path") else ["".join(TEXTS)]
    paths = write(tmp_path / "corpus", texts)
    source = {"str": str(paths[0]), "path": paths[0], "folder": tmp_path / "corpus",
              "glob": str(tmp_path / "corpus" / "*.txt")}[kind]
    tok = build_tokenizer("char", ["".join(texts)])
    prepare(source, tmp_path / "out", tok, workers=1)
    train, val = reference(texts, tok)
    assert ids(tmp_path / "out", "train") == train and ids(tmp_path / "out", "val") == val


@pytest.mark.parametrize("head", [0, 9000])
def test_legacy_encoding_is_kept_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, head: int) -> None:
    """Also where the first 8 KiB are plain ASCII, as a Gutenberg header is (that book was replaced silently)."""
    write(tmp_path / "c", ["plain utf-8\n"])
    (tmp_path / "c" / "cp1252.txt").write_bytes(("a" * head + "it\u2019s \u2014 Gutenberg\n").encode("cp1252"))
    files = resolve_sources(tmp_path / "c")
    assert [f.name for f in files] == ["00.txt", "cp1252.txt"]
    with caplog.at_level("WARNING", logger="transformer_lm.data"):
        prepare(files, tmp_path / "out", ByteTokenizer(), val_fraction=0.5)
    assert caplog.text.count("cp1252.txt is not valid UTF-8") == 1
    text = bytes(ids(tmp_path / "out", "train") + ids(tmp_path / "out", "val")).decode()
    assert text == "plain utf-8\n" + "a" * head + "it\ufffds \ufffd Gutenberg\n"


def test_a_file_named_twice_is_read_once_and_skipped_files_are_reported(tmp_path: Path, caplog) -> None:
    """`tlm prepare c c/a.txt 'c/*.txt'` read a.txt three times, so val's text also sat in train."""
    a, b = write(tmp_path / "c", ["first file\n", "second file\n"])
    (tmp_path / "c" / "utf16.txt").write_bytes("wide text\n".encode("utf-16"))  # NUL bytes: skipped, now with a word
    with caplog.at_level("WARNING", logger="transformer_lm.data"):
        files = resolve_sources([tmp_path / "c", a, str(tmp_path / "c" / "*.txt")])
    assert files == [a, b]
    assert "named more than once" in caplog.text and "skipped 1 empty or binary file(s)" in caplog.text
    assert "utf16.txt" in caplog.text


def test_a_folder_is_read_without_the_prepared_data_and_runs_written_into_it(tmp_path: Path, caplog) -> None:
    """`tlm prepare corpus --out corpus/prepared` made a second prepare (or `tlm train corpus`) read that folder's
    manifest.json and tokenizer.json as text, and a run's config.json and metrics, which change as it trains."""
    (text,) = write(tmp_path / "corpus", ["some text to train on\n" * 5])
    prepare([text], tmp_path / "corpus" / "prepared", ByteTokenizer())
    run = tmp_path / "corpus" / "run"
    run.mkdir()
    for name in ("config.json", "env.json", "tokenizer.json", "metrics.jsonl"):
        (run / name).write_text("{}\n")
    with caplog.at_level("WARNING", logger="transformer_lm.data"):
        assert resolve_sources(tmp_path / "corpus") == [text]
    assert "skipped prepared, run" in caplog.text


def test_a_chunk_is_never_cut_inside_a_word(tmp_path: Path) -> None:
    """Text with no whitespace in a chunk's second half (a base64 blob) was cut mid-word: BPE ids there differed
    from the whole text's."""
    text = "word " * 30 + "x" * 500 + " tail " * 10
    (tmp_path / "blob.txt").write_text(text)
    with mock.patch.object(data, "CHUNK_CHARS", 100):
        chunks = list(data._file_chunks(tmp_path / "blob.txt"))
    assert "".join(chunks) == text and all(not c.endswith("x") or c == chunks[-1] for c in chunks)
    with mock.patch.object(data, "CHUNK_CHARS", 100), mock.patch.object(data, "MAX_CHUNK_CHARS", 300):
        assert max(map(len, data._file_chunks(tmp_path / "blob.txt"))) < 300 + 100  # bounded all the same


def test_a_chunk_is_never_cut_before_an_information_separator(tmp_path: Path) -> None:
    """Python's \\s matches \\x1c-\\x1f, but GPT-2's regex joins them with the punctuation before them: a cut there
    (the only "whitespace" in a chunk's second half) changed BPE ids from those of the whole text."""
    text = "word " * 30 + "a.\x1cb" * 100 + " tail"
    (tmp_path / "sep.txt").write_text(text)
    tok = build_tokenizer("bpe", [text], vocab_size=300)
    with mock.patch.object(data, "CHUNK_CHARS", 100):
        got, _ = data.encode_sources([tmp_path / "sep.txt"], tok)
    assert got.tolist() == tok.encode(text)


def test_bpe_separates_files_with_eot(tmp_path: Path, bpe: Tokenizer) -> None:
    paths = write(tmp_path / "c", TEXTS)
    prepare(paths, tmp_path / "out", bpe, val_fraction=0.4)
    train, val = reference(TEXTS, bpe, 0.4)
    assert ids(tmp_path / "out", "train") == train and ids(tmp_path / "out", "val") == val
    assert ids(tmp_path / "out", "train").count(bpe.eot_id) == 1  # the split falls inside the last file


class WideTokenizer(ByteTokenizer):
    """Byte ids shifted past 65535, to force uint32 storage."""

    @property
    def vocab_size(self) -> int:
        return 70_000

    def encode(self, text: str) -> list[int]:
        return [b + 65_536 for b in super().encode(text)]


def test_dtype_follows_vocab_size(tmp_path: Path) -> None:
    paths = write(tmp_path / "c", TEXTS)
    assert prepare(paths, tmp_path / "small", ByteTokenizer())["dtype"] == "uint16"
    manifest = prepare(paths, tmp_path / "wide", WideTokenizer())
    assert manifest["dtype"] == "uint32"
    train = np.fromfile(tmp_path / "wide" / "train.bin", dtype=np.uint32)
    assert train.tolist() == [b + 65_536 for b in "".join(TEXTS).encode()][: len(train)]


class UpperTokenizer(ByteTokenizer):
    """A kind that tokenizer_from_dict does not know."""

    kind = "upper"

    def encode(self, text: str) -> list[int]:
        return super().encode(text.upper())


def test_a_tokenizer_workers_cannot_rebuild_encodes_in_this_process(tmp_path: Path) -> None:
    """Workers rebuild the tokenizer from its dict: a subclass keeping its base's kind was rebuilt as the base (other
    ids), and one of an unknown kind failed in every worker, which the pool respawned forever."""
    paths = write(tmp_path / "c", TEXTS)
    for tok in (WideTokenizer(), UpperTokenizer()):
        with mock.patch.object(data, "CHUNK_CHARS", 50):  # a corpus of several chunks: 2 workers
            dtype = prepare(paths, tmp_path / tok.kind, tok, workers=2)["dtype"]
        got = [np.fromfile(tmp_path / tok.kind / f"{split}.bin", dtype=dtype).tolist() for split in ("train", "val")]
        assert got == list(reference(TEXTS, tok))  # raw files: loading rebuilds the tokenizer from its dict too


def test_workers_that_die_end_prepare_with_one_error() -> None:
    """multiprocessing.Pool replaced a worker that failed to start forever, so prepare hung (a script without the
    `__main__` guard, whose workers re-run it on import); now the run ends with a DataError naming the fix."""
    pieces = iter([("train", "some text", False)] * 8)
    with pytest.raises(DataError, match="__main__"):
        list(data._encoded(pieces, UpperTokenizer(), np.dtype(np.uint16), workers=2))  # its kind fails in workers


def big_corpus() -> list[str]:
    """Prose, indented code with blank-line runs and CRLF endings, and a file without line breaks."""
    prose = "".join(f"line {i} of the corpus, {'ü' * (i % 3)} words  words\n" for i in range(150))
    code = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(60)).replace("\n", "\r\n")
    return [prose, "  " + code, "no line break at all, only spaces " * 40]


@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_equals_single_chunk(tmp_path: Path, workers: int, bpe: Tokenizer) -> None:
    texts = big_corpus()
    paths = write(tmp_path / "c", texts)
    for name, tok in [("byte", ByteTokenizer()), ("bpe", bpe)]:
        whole = prepare(paths, tmp_path / f"{name}-whole", tok, workers=1)
        with mock.patch.object(data, "CHUNK_CHARS", 97):  # ~150 chunks
            chunked = prepare(paths, tmp_path / f"{name}-chunked", tok, workers=workers)
        train, val = reference(texts, tok)
        for folder in (f"{name}-whole", f"{name}-chunked"):
            assert ids(tmp_path / folder, "train") == train and ids(tmp_path / folder, "val") == val
        assert {k: v for k, v in chunked.items() if k != "created"} == {
            k: v for k, v in whole.items() if k != "created"}


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=4),
       chunk=st.integers(1, 20), val_fraction=st.floats(0.05, 0.95))
def test_split_and_chunks_property(texts: list[str], chunk: int, val_fraction: float) -> None:
    full = "".join(texts)
    n_train = int(len(full) * (1 - val_fraction))
    assume(n_train >= 2 and len(full[n_train:].encode()) >= 2)
    with tempfile.TemporaryDirectory() as d, mock.patch.object(data, "CHUNK_CHARS", chunk):
        m = prepare(write(Path(d) / "c", texts), Path(d) / "out", ByteTokenizer(), val_fraction=val_fraction,
                    workers=1)
        assert m["train_chars"] == n_train
        assert ids(Path(d) / "out", "train") == list(full[:n_train].encode())
        assert ids(Path(d) / "out", "val") == list(full[n_train:].encode())


def test_default_corpus() -> None:
    files = default_corpus()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert not any({"test", "tests", "site-packages", "idlelib"} & set(f.parts) for f in files)


def test_batch_sampler() -> None:
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 65_521
    sampler = BatchSampler(tokens, batch_size=4, block_size=16, seed=0)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        start = tokens.tolist().index(row_x[0])
        assert row_x + row_y[-1:] == tokens[start : start + 17].tolist()
    again = BatchSampler(tokens, 4, 16, seed=0)
    assert torch.equal(again.next()[0], x)
    assert not torch.equal(BatchSampler(tokens, 4, 16, seed=1).next()[0], x)


def test_batch_sampler_resume_is_exact() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    first = BatchSampler(tokens, 3, 8, seed=42)
    for _ in range(3):
        first.next()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    expected = [first.next() for _ in range(4)]
    resumed = BatchSampler(tokens, 3, 8, seed=7)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert resumed.batches_drawn == 3
    for x, y in expected:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_batch_sampler_edges() -> None:
    x, y = BatchSampler(np.arange(9), 2, 8, seed=0).next()  # exactly one window fits
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2
    with pytest.raises(DataError, match="block_size"):
        BatchSampler(np.arange(8), 2, 8, seed=0)
    with pytest.raises(ConfigError):
        BatchSampler(np.arange(8), 0, 4, seed=0)


@pytest.mark.parametrize("n", [2, 17, 33, 64, 65, 100])
def test_eval_batches_cover_the_split_once(n: int) -> None:
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size=3, block_size=8))
    assert torch.cat([y.flatten() for _, y in batches]).tolist() == list(range(1, n))
    for x, y in batches:
        assert x.dtype == torch.int64 and x.shape == y.shape and x.shape[0] <= 3 and x.shape[1] <= 8
        assert torch.equal(x + 1, y)
    again = list(iter_eval_batches(tokens, 3, 8))
    assert len(again) == len(batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    assert len(list(iter_eval_batches(tokens, 3, 8, max_batches=1))) == 1



@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.integers(1, 9))
def test_conversation_windows_cover_each_target_once_inside_its_conversation(lengths: list[int], block: int) -> None:
    """Every token from 1 on is predicted by exactly one window, which begins at its conversation's first token or
    a whole number of windows after it, never predicts past the conversation's end (its next one's first token)
    and predicts at most `block` tokens."""
    starts = np.cumsum([0, *lengths[:-1]])
    n = sum(lengths)
    assume(n >= 2)
    begin, end = conversation_chunks(starts, n, block)
    owner = np.searchsorted(starts, np.arange(n), side="right") - 1  # the conversation each token is in
    covering = [[i for i, (b, e) in enumerate(zip(begin, end)) if b < t <= e] for t in range(1, n)]
    assert all(len(c) == 1 for c in covering)
    for b, e in zip(begin, end):
        c = owner[b]
        assert (b - starts[c]) % block == 0 and 0 < e - b <= block
        assert e <= (starts[c + 1] if c + 1 < len(starts) else n - 1)


def test_masked_eval_batches_score_each_conversation_from_its_start() -> None:
    """Of conversations, rows are right-padded windows that begin where a conversation does; the targets are the
    mask's tokens, each once, and padding is no target."""
    tokens = np.arange(100, 130, dtype=np.uint16)
    mask = np.arange(30) % 3 == 0  # every third token learned
    starts = np.array([0, 4, 15, 16])
    batches = list(iter_eval_batches(tokens, 2, 8, mask=mask, starts=starts))
    rows = [(x[r], y[r]) for x, y in batches for r in range(len(x))]
    assert [int(x[0]) - 100 for x, _ in rows] == [0, 4, 12, 15, 16, 24]  # 11 tokens: windows from 4 and 12
    assert sorted(int(t) for _, y in rows for t in y if t >= 0) == [100 + t for t in range(1, 30) if t % 3 == 0]
    for x, y in rows:
        width = int((x > 0).sum())
        assert torch.equal(x[:width], torch.arange(int(x[0]), int(x[0]) + width)) and (y[width:] == -1).all()
    sampler = BatchSampler(tokens, 400, 8, seed=0, mask=mask, starts=starts)
    assert {int(r[0]) - 100 for r in sampler.next()[0]} == {0, 4, 12, 15, 16, 21}  # 24 ends past the last window
    sampler = BatchSampler(tokens, 4, 8, seed=0, mask=mask, starts=starts)
    assert (sampler.next()[0][:, 0] - 100).tolist() == [12, 15, 21, 0]
    # each token's place in its example (from the window's start where the example began before it), and which
    # example of the window it is of: 12-14 end the one from 4, 15 is one alone, 16 begins the last
    assert sampler.layout["positions"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4, 5, 6],
                                                    [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert sampler.layout["segments"].tolist() == [[0, 0, 0, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1],
                                                   [0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        resolve_sources(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        resolve_sources(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="matches no files"):
        resolve_sources(str(tmp_path / "*.md"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty text files"):
        resolve_sources(tmp_path / "folder")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="looks binary"):
        resolve_sources(tmp_path / "blob.txt")
    (tmp_path / "wide.txt").write_text("PowerShell's > writes UTF-16\n", encoding="utf-16")
    with pytest.raises(DataError, match="iconv -f UTF-16 -t UTF-8"):
        resolve_sources(tmp_path / "wide.txt")


def test_a_pipe_is_named_as_one(tmp_path: Path) -> None:
    """`tlm prepare <(zcat corpus.gz)` said the path /dev/fd/63 does not exist."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="not a regular file"):
        resolve_sources(tmp_path / "fifo")


def test_prepare_errors(tmp_path: Path) -> None:
    short = write(tmp_path / "c", ["abcde"])  # int(5 * 0.9) = 4 train chars, 1 val char
    with pytest.raises(DataError, match="val split has 1 token"):
        prepare(short, tmp_path / "out", ByteTokenizer())
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        prepare(short, tmp_path / "out", ByteTokenizer(), val_fraction=0)
    with pytest.raises(DataError, match="cannot read"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out", ByteTokenizer())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(RunExistsError, match="holds no prepared data|no prepared data tlm wrote"):
            prepare(write(tmp_path / "d", TEXTS), tmp_path / "busy", ByteTokenizer(), overwrite=overwrite)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_prepare_replaces_prepared_data_only_when_asked_and_never_its_sources(tmp_path: Path, capsys) -> None:
    """A second `tlm prepare data/input.txt --out data` replaced the folder whole, the text it read included."""
    out = tmp_path / "data"
    text = write(out, ["a text to prepare, long enough to split. " * 20])[0]  # data/0.txt, inside --out
    prepare([text], tmp_path / "first", ByteTokenizer())
    (out / "manifest.json").write_text((tmp_path / "first" / "manifest.json").read_text())  # out looks prepared
    for overwrite in ("false", "true"):
        assert main(["prepare", str(text), "--out", str(out), "--overwrite", overwrite]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--overwrite true" in err if overwrite == "false" else "which this command "
                                                                                                 "reads" in err), err
    assert text.is_file()
    assert main(["prepare", str(text), "--out", str(tmp_path / "first")]) == 2  # prepared data: replaced when asked
    assert "already holds prepared data" in capsys.readouterr().err
    assert main(["prepare", str(text), "--out", str(tmp_path / "first"), "--overwrite", "true",
                 "--tokenizer", "char"]) == 0
    assert load_prepared(tmp_path / "first").manifest["tokenizer"]["kind"] == "char"


def test_prepare_into_a_symlink_replaces_its_target(tmp_path: Path) -> None:
    """The link itself was replaced by a plain folder beside it (on the link's disk, not the target's), and the old
    data was left behind a hidden link."""
    paths = write(tmp_path / "c", TEXTS)
    (tmp_path / "big").mkdir()
    (tmp_path / "work").mkdir()
    link = tmp_path / "work" / "data"
    link.symlink_to(tmp_path / "big")
    prepare(paths, link, ByteTokenizer())
    prepare(paths[:1], link, ByteTokenizer(), overwrite=True)
    assert link.is_symlink() and [p.name for p in (tmp_path / "work").iterdir()] == ["data"]
    assert load_prepared(tmp_path / "big").train.tolist() == reference(TEXTS[:1], ByteTokenizer())[0]


def test_prepare_refuses_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tlm prepare text --out .` in an empty folder crashed with a ValueError (a path with an empty name)."""
    paths = write(tmp_path / "c", TEXTS)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", ".."):
        with pytest.raises(DataError, match="holds the working directory"):
            prepare(paths, out, ByteTokenizer())
    assert not any((tmp_path / "here").iterdir())


def test_a_folder_filled_while_preparing_is_kept(tmp_path: Path) -> None:
    """Without --overwrite, a --out that was missing or empty when prepare began but filled before it ended (by hand,
    or by a second prepare of the same cache entry) was moved aside and deleted."""
    paths, out = write(tmp_path / "c", TEXTS), tmp_path / "out"
    encoded = data._encoded

    def filled_meanwhile(*args):
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        yield from encoded(*args)

    with mock.patch.object(data, "_encoded", filled_meanwhile), pytest.raises(RunExistsError, match="filled while"):
        prepare(paths, out, ByteTokenizer())
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]  # no hidden folder left either


def test_load_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no manifest"):
        load_prepared(tmp_path)
    prepare(write(tmp_path / "c", TEXTS), out, ByteTokenizer())
    manifest = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(manifest[:40])
    with pytest.raises(DataError, match="corrupt"):
        load_prepared(out)
    (out / "manifest.json").write_text(manifest.replace('"format": 1', '"format": 99'))
    with pytest.raises(DataError, match="corrupt"):
        load_prepared(out)
    (out / "manifest.json").write_text(manifest)
    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="val.bin has"):
        load_prepared(out)


class FailingTokenizer(ByteTokenizer):
    """Raises on its fifth call, like a prepare killed midway."""

    calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if self.calls == 5:
            raise RuntimeError("interrupted")
        return super().encode(text)


def test_failed_prepare_leaves_nothing_and_keeps_old_data(tmp_path: Path) -> None:
    paths = write(tmp_path / "c", big_corpus())
    out = tmp_path / "out"
    with mock.patch.object(data, "CHUNK_CHARS", 200), pytest.raises(RuntimeError):
        prepare(paths, out, FailingTokenizer(), workers=1)
    assert not is_prepared(out) and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp folder left behind
    prepare(paths[:1], out, ByteTokenizer())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with mock.patch.object(data, "CHUNK_CHARS", 200), pytest.raises(RuntimeError):
        prepare(paths, out, FailingTokenizer(), workers=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]
    prepare(paths, out, ByteTokenizer(), overwrite=True)  # a successful prepare replaces a prepared folder
    assert load_prepared(out).manifest["sources"][-1]["path"] == str(paths[-1].resolve())
