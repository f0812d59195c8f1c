"""The `tlm` command end to end, and every bad input: one line on stderr, exit code 2, nothing damaged."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer_lm.api import load_run
from transformer_lm.cli import main
from transformer_lm.data import load_prepared

TINY = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
        "--train.batch_size", "4", "--train.eval_batches", "2", "--train.log_interval", "1"]


def tlm(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trained_run(tmp_path: Path, corpus_file: Path, capsys) -> Path:
    run = tmp_path / "run"
    code, _, err = tlm(capsys, "train", corpus_file, "--out", run, "--tokenizer", "char", *TINY,
                       "--train.max_iters", "6", "--train.eval_interval", "3")
    assert code == 0, err
    return run


def test_prepare_train_sample_eval_end_to_end(tmp_path: Path, corpus_file: Path, capsys):
    data = tmp_path / "prepared"
    code, out, err = tlm(capsys, "prepare", corpus_file, "--out", data, "--tokenizer", "bpe", "--vocab_size", "300")
    assert code == 0, err
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["train_tokens"] > manifest["val_tokens"] > 0

    run = tmp_path / "run"
    code, out, err = tlm(capsys, "train", data, "--out", run, *TINY, "--train.max_iters", "8",
                         "--train.eval_interval", "4")
    assert code == 0, err
    assert "8 steps" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["model"]["vocab_size"] == 300

    code, out, err = tlm(capsys, "sample", run, "def ", "--max_new_tokens", "20", "--seed", "0", "--num_samples", "2")
    assert code == 0, err
    assert out.count("--- sample") == 2 and out.count("def ") >= 2
    code, out2, _ = tlm(capsys, "sample", run, "def ", "--max_new_tokens", "20", "--seed", "0", "--num_samples", "2")
    assert out2 == out  # seeded

    code, out, err = tlm(capsys, "eval", run, "--data", corpus_file, "--json", "true")
    assert code == 0, err
    res = json.loads(out)
    assert set(res) == {"loss", "perplexity", "bpb", "tokens"} and res["loss"] > 0

    # the prepared folder itself: its val split, scored window by window as a naive loop would (it read the
    # folder's JSON files as text before)
    code, out, err = tlm(capsys, "eval", run, "--data", data, "--json", "true")
    assert code == 0, err
    res, loaded, val = json.loads(out), load_run(run, "cpu"), load_prepared(data).val
    block, nll = loaded.model.config.block_size, 0.0
    with torch.no_grad():
        for start in range(0, len(val) - 1, block):
            window = torch.from_numpy(val[start : start + block + 1].astype(np.int64))[None]
            logits = loaded.model(window[:, :-1]).logits
            nll += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
    assert res["tokens"] == len(val) - 1 and res["loss"] == pytest.approx(nll / (len(val) - 1), rel=1e-5)

    # a folder of two files scores the stream prepare writes: an end-of-text between them; bits per byte over the
    # bytes of the tokens predicted (all but the first)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("def f(x):\n    return x\n")
    (docs / "b.txt").write_text("naïve = 2\n")
    code, out, err = tlm(capsys, "eval", run, "--data", docs, "--json", "true")
    assert code == 0, err
    res, tok = json.loads(out), loaded.tokenizer
    ids = [*tok.encode("def f(x):\n    return x\n"), tok.eot_id, *tok.encode("naïve = 2\n")]
    assert res["tokens"] == len(ids) - 1
    predicted_bytes = len("def f(x):\n    return x\nnaïve = 2\n".encode()) - len(tok.decode(ids[:1]).encode())
    assert res["bpb"] == pytest.approx(res["loss"] / math.log(2) * (len(ids) - 1) / predicted_bytes)
    other = tmp_path / "other"
    assert tlm(capsys, "prepare", corpus_file, "--out", other, "--tokenizer", "char")[0] == 0
    one_line_error(capsys, "eval", run, "--data", other, match="prepared with another tokenizer")

    code, out, err = tlm(capsys, "info", run)
    assert code == 0 and "parameters" in out


def test_sample_greedy_stop_strings_and_stdin(trained_run: Path, capsys, monkeypatch):
    code, out, _ = tlm(capsys, "sample", trained_run, "de", "--greedy", "true", "--max_new_tokens", "30")
    assert code == 0
    code, again, _ = tlm(capsys, "sample", trained_run, "de", "--greedy", "true", "--max_new_tokens", "30")
    assert again == out  # greedy is deterministic without a seed
    generated = out[len("de"):-1]
    if len(generated) > 3:  # stop on a string the greedy output contains: output ends right before it
        stop = generated[2:4]
        code, cut, _ = tlm(capsys, "sample", trained_run, "de", "--greedy", "true", "--max_new_tokens", "30",
                           "--stop", json.dumps([stop]))
        assert cut == "de" + generated[: generated.index(stop)] + "\n"
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("de"))
    code, piped, _ = tlm(capsys, "sample", trained_run, "--greedy", "true", "--max_new_tokens", "30")
    assert piped == out


def test_a_stop_string_with_a_literal_backslash_escape_is_warned_of(trained_run: Path, capsys, caplog):
    """Only a double-quoted YAML item has its escapes read: --stop+ '\\n' and --stop '[\\n]' hold a backslash and
    an n, which silently never stopped a sample at a newline."""
    for stop in (["--stop+", "\\n"], ["--stop", "[\\n]"], ["--stop", '["\\n"]']):
        caplog.clear()
        assert tlm(capsys, "sample", trained_run, "de", "--max_new_tokens", "2", *stop)[0] == 0
        warned = "not a control character" in caplog.text
        assert warned == (stop[1] != '["\\n"]'), (stop, caplog.text)


def test_long_prompt_is_cropped_with_a_warning(trained_run: Path, monkeypatch):
    """The warning comes before the sample is written: printed after the prompt, it landed mid-line on a terminal."""
    out = io.StringIO()
    written_at_warning = []
    monkeypatch.setattr(sys, "stdout", out)
    spy = logging.Handler()
    spy.emit = lambda record: written_at_warning.append((record.getMessage(), out.getvalue()))
    logging.getLogger().addHandler(spy)
    try:
        assert main(["sample", str(trained_run), "def " * 40, "--max_new_tokens", "5", "--seed", "1"]) == 0
    finally:
        logging.getLogger().removeHandler(spy)
    crops = [written for message, written in written_at_warning if "leaves no room for a new token" in message]
    assert crops == [""] and out.getvalue().startswith("def " * 40)


def test_info_preset_and_override(capsys):
    code, out, _ = tlm(capsys, "info", "--preset", "gpt2", "--json", "true")
    assert json.loads(out)["params"] == 124_439_808
    # --model.* overrides a preset whatever the order
    code, out, _ = tlm(capsys, "info", "--model.n_layer", "6", "--preset", "gpt2", "--json", "true")
    info = json.loads(out)
    assert info["config"]["n_layer"] == 6 and info["config"]["n_embd"] == 768


def test_recipe_preset_sets_train_defaults_that_flags_override():
    from transformer_lm.cli import parse
    from transformer_lm.config import preset_recipe

    recipe = preset_recipe("shakespeare-speedrun")
    ns = parse(["train", "--train.max_iters", "7", "--preset", "shakespeare-speedrun"]).train
    assert ns.model.pos_encoding == "rope" and ns.model.block_size == 64
    assert ns.train.optimizer == recipe["optimizer"] == "muon" and ns.train.schedule == "wsd"
    assert ns.train.batch_size == recipe["batch_size"] and ns.train.max_iters == 7
    assert parse(["train", "--preset", "tiny"]).train.train.optimizer == "adamw"  # architecture-only preset


def test_help_lists_every_option_with_default_and_description(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, doc in [("--model.n_kv_head", "grouped-query"), ("--train.max_time", "wall-clock"),
                        ("--train.lr", "Peak learning rate"), ("--tokenizer", "byte, char, bpe")]:
        assert option in text and doc in text, option
    assert "Peak learning rate. (type: float, default: 0.002)" in text


def one_line_error(capsys, *argv: str, match: str) -> str:
    code, out, err = tlm(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlm: error:"), err
    assert match in lines[0], lines[0]
    return lines[0]


def test_data_errors(tmp_path: Path, capsys):
    out = tmp_path / "r"
    one_line_error(capsys, "train", tmp_path / "missing.txt", "--out", out, match="missing.txt")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(capsys, "train", tmp_path / "empty.txt", "--out", out, match="empty")
    one_line_error(capsys, "prepare", str(tmp_path / "*.nothing"), "--out", out, match="*.nothing")
    (tmp_path / "short.txt").write_text("shorter than one window of 32\n")
    one_line_error(capsys, "train", tmp_path / "short.txt", "--out", out, "--tokenizer", "char", *TINY,
                   match="block_size")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 10)
    one_line_error(capsys, "train", tmp_path / "binary.bin", "--out", out, match="binary.bin")
    one_line_error(capsys, "eval", tmp_path / "nowhere", "--data", tmp_path / "short.txt", match="not a run folder")
    # what the operating system refuses is one line too, naming the path (here --out is inside a file)
    (tmp_path / "long.txt").write_text("long enough for a window of 32 tokens, " * 20)
    one_line_error(capsys, "train", tmp_path / "long.txt", "--out", tmp_path / "binary.bin" / "run", "--tokenizer",
                   "char", *TINY, match="Not a directory; check the path")
    assert (tmp_path / "binary.bin").read_bytes() == bytes(range(256)) * 10
    # checked before minutes of measuring: a folder, or a path under a file (a missing folder is created)
    one_line_error(capsys, "bench", "--json", tmp_path, match="is a folder; give a file path")
    one_line_error(capsys, "bench", "--json", tmp_path / "binary.bin" / "b.json", match="binary.bin: File exists")
    for experiment in ("pe-ablation", "speed", "long-range"):  # --out refused before any training, not after
        one_line_error(capsys, "experiment", experiment, "--out", tmp_path / "long.txt", match="long.txt: File exists")
    # --seq_len 0 was planned at the block size
    one_line_error(capsys, "memory", "--seq_len", "0", match="seq_len must be in [1, block_size=256], got 0")
    one_line_error(capsys, "plan", "--params", "1e300", "--tokens", "1e300", match="overflows")  # was JSON Infinity


def test_a_hugging_face_folder_is_named_as_one(tmp_path: Path, capsys):
    """A transformers folder (one `tlm export` wrote, or a download) given where a run goes was called a corrupt run
    config ('model'), with no word of `tlm convert`."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                "n_embd": 16, "n_layer": 1, "n_head": 2}))
    (tmp_path / "text.txt").write_text("some text to score\n")
    for argv in (["eval", hf, "--data", tmp_path / "text.txt"], ["info", hf], ["sample", hf, "hi"]):
        line = one_line_error(capsys, *argv, match="is a Hugging Face model folder, not a run folder")
        assert f"tlm convert {hf} --out RUN" in line and "corrupt" not in line
    (hf / "config.json").write_text(json.dumps({"train": {}}))  # a run config without its model: corrupt, as before
    one_line_error(capsys, "info", hf, match="is corrupt ('model')")


@pytest.mark.parametrize("args,match", [
    (["--model.n_embd", "30", "--model.n_head", "4"], "divisible by model.n_head"),
    (["--model.n_kv_head", "3"], "divisible by model.n_kv_head"),
    (["--model.block_size", "0"], "block_size must be >= 1"),
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["--tokenizer", "wordpiece"], "wordpiece"),
    (["--train.max_iters", "-1"], "max_iters"),
    (["--model.n_layer", "two"], "n_layer"),
    (["--train.grad_clip", "-1"], "train.grad_clip must be >= 0"),  # was accepted: gradient ascent
    (["--train.beta1", "1.5"], "train.beta1 must be in [0, 1)"),  # was torch's traceback
    (["--train.warmup_iters", "-1"], "train.warmup_iters must be >= 0"),
    (["--model.pos_encoding", "rope", "--model.rope_theta", "0"], "model.rope_theta must be > 1"),  # was nan loss
])
def test_config_errors(args, match, corpus_file: Path, tmp_path: Path, capsys):
    one_line_error(capsys, "train", corpus_file, "--out", tmp_path / "r", *args, match=match)
    assert not (tmp_path / "r").exists()


def test_checkpoint_errors_leave_run_intact(trained_run: Path, corpus_file: Path, capsys):
    files = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    one_line_error(capsys, "train", corpus_file, "--out", trained_run, "--tokenizer", "char", *TINY,
                   match="already holds a run")
    one_line_error(capsys, "train", corpus_file, "--out", trained_run, "--tokenizer", "char", *TINY,
                   "--model.n_layer", "3", "--resume", "true", match="different model config")
    assert files == {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    # the char tokenizer cannot encode characters it never saw
    one_line_error(capsys, "sample", trained_run, "日本", match="'日'")
    one_line_error(capsys, "sample", trained_run, "de", "--stop", "x", match="--stop '[a, b]'")  # how lists are written
    weights = next(trained_run.glob("checkpoints/step-*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    one_line_error(capsys, "sample", trained_run, "de", match="truncated or corrupt")
    weights.write_bytes(b"\x07" * 64)
    one_line_error(capsys, "eval", trained_run, "--data", corpus_file, match="truncated or corrupt")
    weights.unlink()
    one_line_error(capsys, "sample", trained_run, "de", match="missing weights")


def test_sample_input_errors_come_before_any_output(trained_run: Path, capsys):
    code, out, err = tlm(capsys, "sample", trained_run, "日本")
    assert code == 2 and out == "" and "'日'" in err  # the prompt was printed, then the error
    one_line_error(capsys, "sample", trained_run, "de", "--stop", '["", "x"]', match="empty string")
    one_line_error(capsys, "sample", trained_run, "de", "--seed", str(2**70), match="seed must be in")  # a traceback
    # each names the option that is wrong and its value (one message named both, whichever was)
    one_line_error(capsys, "sample", trained_run, "de", "--num_samples", "0", match="num_samples must be >= 1, got 0")
    one_line_error(capsys, "sample", trained_run, "de", "--max_new_tokens", "-1",
                   match="max_new_tokens must be >= 0, got -1")
    one_line_error(capsys, "sample", trained_run, "de", "--device", "meta", match="not supported")  # a traceback
    one_line_error(capsys, "eval", trained_run, "--data", "de", "--device", "meta", match="not supported")
    one_line_error(capsys, "sample", trained_run, "--seed", "1", "de", match="right after the run folder")


def test_api_prompt_and_draft_arguments(trained_run: Path):
    from transformer_lm.api import load_run
    from transformer_lm.errors import ConfigError

    run = load_run(trained_run, "cpu")
    for bad in ([1, 2, 3], 5):
        with pytest.raises(ConfigError, match="the prompt must be text"):
            run.generate(bad, max_new_tokens=2)
    greedy = run.generate("de", max_new_tokens=8, greedy=True)
    assert run.use_draft(trained_run, k=3).generate("de", max_new_tokens=8, greedy=True) == greedy  # a folder
    with pytest.raises(ConfigError, match="temperature must be a finite number"):  # NaN drew id 0 every time
        run.generate("de", max_new_tokens=2, temperature=float("nan"))


def test_a_hand_edited_run_config_of_the_wrong_type_is_one_line(trained_run: Path, capsys):
    config = json.loads((trained_run / "config.json").read_text())
    for field, value, match in (("n_layer", 1.5, "model.n_layer must be an integer, got 1.5"),
                                ("n_embd", "32", "model.n_embd must be an integer, got '32'"),
                                ("norm", "batchnorm", "model.norm must be one of 'layernorm', 'rmsnorm'")):
        (trained_run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], field: value}}))
        one_line_error(capsys, "sample", trained_run, "de", match=match)
        one_line_error(capsys, "info", trained_run, match=match)


def test_a_run_with_another_runs_tokenizer_or_corrupt_ids_is_one_line(trained_run: Path, corpus_file: Path,
                                                                       tmp_path: Path, capsys):
    code, _, err = tlm(capsys, "prepare", corpus_file, "--out", tmp_path / "bytes", "--tokenizer", "byte")
    assert code == 0, err
    (trained_run / "tokenizer.json").write_bytes((tmp_path / "bytes" / "tokenizer.json").read_bytes())
    one_line_error(capsys, "sample", trained_run, "de", match="the run folder mixes two runs' files")
    train_bin = tmp_path / "bytes" / "train.bin"
    ids = np.fromfile(train_bin, dtype=np.uint16)
    ids[::7] = 1000  # the byte tokenizer has 256 ids
    ids.tofile(train_bin)
    one_line_error(capsys, "train", tmp_path / "bytes", "--out", tmp_path / "r", *TINY, "--train.max_iters", "2",
                   match="holds token id 1000")


def test_a_tokenizer_given_for_a_prepared_folder_is_refused_not_ignored(corpus_file: Path, tmp_path: Path, capsys):
    """`tlm train data/corpus --tokenizer bpe` trained on the folder's char ids as if the flag were not there."""
    data = tmp_path / "chars"
    assert tlm(capsys, "prepare", corpus_file, "--out", data, "--tokenizer", "char")[0] == 0
    one_line_error(capsys, "train", data, "--out", tmp_path / "r", "--tokenizer", "bpe", *TINY,
                   match=f"{data} was prepared with the char tokenizer; --tokenizer bpe applies to raw text only")
    assert not (tmp_path / "r").exists()
    code, _, err = tlm(capsys, "train", data, "--out", tmp_path / "r", "--tokenizer", "char", *TINY,
                       "--train.max_iters", "2")  # the folder's own kind, named, is fine
    assert code == 0, err
    code, _, err = tlm(capsys, "train", "--out", tmp_path / "r", "--resume", "true", "--train.max_iters", "3")
    assert code == 0, err  # the resumed run's saved tokenizer kind is its folder's


def test_overwrite_replaces_a_run(trained_run: Path, corpus_file: Path, capsys):
    code, _, err = tlm(capsys, "train", corpus_file, "--out", trained_run, "--tokenizer", "byte", *TINY,
                       "--train.max_iters", "2", "--overwrite", "true")
    assert code == 0, err
    assert json.loads((trained_run / "config.json").read_text())["model"]["vocab_size"] == 256


def test_overwrite_refuses_to_delete_what_the_command_reads(trained_run: Path, tmp_path: Path, capsys):
    """`tlm export RUN --out RUN --overwrite true` would have deleted the run it exports."""
    files = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    one_line_error(capsys, "export", trained_run, "--out", trained_run, "--overwrite", "true",
                   match="which this command reads")
    one_line_error(capsys, "export", trained_run, "--out", trained_run / "checkpoints", "--overwrite", "true",
                   match="no export tlm wrote")
    one_line_error(capsys, "export", trained_run, "--out", tmp_path, "--overwrite", "true",
                   match="which this command reads")
    one_line_error(capsys, "convert", trained_run, "--out", tmp_path / "c", match="is a tlm run folder")
    (tmp_path / "data.csv").write_text("a,b\n")  # report writes only over an .html page
    one_line_error(capsys, "report", trained_run, "--out", tmp_path / "data.csv", match="not an .html page")
    assert (tmp_path / "data.csv").read_text() == "a,b\n"
    assert files == {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}


def test_yaml_config_with_command_line_override(tmp_path: Path, corpus_file: Path, capsys):
    (tmp_path / "run.yaml").write_text(
        "preset: tiny\ntokenizer: char\nmodel:\n  n_layer: 1\n  n_head: 2\n  n_embd: 16\n  block_size: 16\n"
        "train:\n  batch_size: 2\n  max_iters: 3\n  eval_batches: 1\n  lr: 0.01\n")
    run = tmp_path / "run"
    code, _, err = tlm(capsys, "train", corpus_file, "--config", tmp_path / "run.yaml", "--out", run,
                       "--train.max_iters", "4")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["model"]["n_embd"] == 16
    assert config["train"]["max_iters"] == 4 and config["train"]["lr"] == 0.01
    assert config["data"]["tokenizer"] == "char"


def test_default_corpus_is_the_standard_library(tmp_path: Path, capsys):
    """With no data argument, `tlm train` trains on this interpreter's standard library source: no download."""
    run = tmp_path / "run"
    code, _, err = tlm(capsys, "train", "--out", run, *TINY, "--train.max_iters", "2", "--train.eval_batches", "1")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["source"] == "python-stdlib" and config["model"]["vocab_size"] == 256
    code, out, _ = tlm(capsys, "sample", run, "import ", "--max_new_tokens", "5", "--seed", "0")
    assert code == 0 and out.startswith("import ")


def test_resume_finds_the_runs_data_and_refuses_other_tokenizers(trained_run: Path, corpus_file: Path, capsys):
    code, out, err = tlm(capsys, "train", "--out", trained_run, "--tokenizer", "char", *TINY, "--train.max_iters", "8",
                         "--train.eval_interval", "3", "--resume", "true")
    assert code == 0, err
    assert "8 steps" in out
    one_line_error(capsys, "train", corpus_file, "--out", trained_run, "--tokenizer", "byte", *TINY,
                   "--train.max_iters", "8", "--train.eval_interval", "3", "--resume", "true",
                   match="tokenizer differs")


def test_resume_after_the_cache_is_emptied_prepares_the_runs_own_data(trained_run: Path, corpus_file: Path,
                                                                       tmp_path: Path, monkeypatch, capsys):
    """The prepared cache of raw text gone (evicted, another machine): `--resume true` alone trained on the embedded
    stdlib corpus instead, exit 0, and recorded "python-stdlib" as the run's data. Now its recorded source is
    prepared again with its tokenizer; with the source gone too, a one-line error asks for the data."""
    shutil.rmtree(json.loads((trained_run / "config.json").read_text())["data"]["prepared"])
    monkeypatch.setenv("TLM_CACHE_DIR", str(tmp_path / "empty-cache"))
    code, out, err = tlm(capsys, "train", "--out", trained_run, "--resume", "true", "--train.max_iters", "8")
    assert code == 0 and "8 steps" in out, err
    config = json.loads((trained_run / "config.json").read_text())
    assert config["data"]["source"] == str(corpus_file) and config["data"]["tokenizer"] == "char"
    assert config["data"]["prepared"].startswith(str(tmp_path / "empty-cache"))
    shutil.rmtree(config["data"]["prepared"])
    monkeypatch.setenv("TLM_CACHE_DIR", str(tmp_path / "another-cache"))
    corpus_file.unlink()
    one_line_error(capsys, "train", "--out", trained_run, "--resume", "true", "--train.max_iters", "9",
                   match="is gone")
    assert not (tmp_path / "another-cache").exists()


def test_resume_with_a_named_preset_of_another_model_is_refused(trained_run: Path, tmp_path: Path, capsys):
    """A --preset named on resume was silently ignored (the saved model won) yet recorded in config.json."""
    one_line_error(capsys, "train", "--out", trained_run, "--resume", "true", "--preset", "tiny-llama",
                   match="different model config")
    code, _, err = tlm(capsys, "train", "--out", trained_run, "--resume", "true", "--train.max_iters", "7")
    assert code == 0, err
    assert json.loads((trained_run / "config.json").read_text())["preset"] == "tiny"  # as the run was started
    one_line_error(capsys, "train", "--out", tmp_path / "nothing", "--resume", "true", match="has no checkpoint")
    assert not (tmp_path / "nothing").exists()


def test_resume_after_the_cache_is_emptied_keeps_a_bpe_vocabulary(corpus_file: Path, tmp_path: Path, capsys):
    """A bpe run prepared again was tokenized with the default 4,096 ids, then refused as "another tokenizer"."""
    run = tmp_path / "bpe"
    code, _, err = tlm(capsys, "train", corpus_file, "--out", run, "--tokenizer", "bpe", "--vocab_size", "300", *TINY,
                       "--train.max_iters", "2")
    assert code == 0, err
    shutil.rmtree(json.loads((run / "config.json").read_text())["data"]["prepared"])
    code, out, err = tlm(capsys, "train", "--out", run, "--resume", "true", "--train.max_iters", "3")
    assert code == 0 and "3 steps" in out, err


def test_resume_with_a_recipe_preset_keeps_the_runs_training_settings(corpus_file: Path, tmp_path: Path, capsys):
    """Naming the run's recipe preset again put the recipe's lr and warmup back over the run's own, mid-run; one
    named in a --config file was neither applied nor refused."""
    run = tmp_path / "run"
    code, _, err = tlm(capsys, "train", corpus_file, "--out", run, "--tokenizer", "char", "--preset",
                       "shakespeare-speedrun", "--train.lr", "1e-3", "--train.warmup_iters", "1", *TINY,
                       "--train.max_iters", "2", "--train.optimizer", "adamw")  # its Muon needs torch >= 2.9
    assert code == 0, err
    code, _, err = tlm(capsys, "train", "--out", run, "--resume", "true", "--preset", "shakespeare-speedrun", *TINY,
                       "--train.max_iters", "3")
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["lr"], saved["warmup_iters"], saved["max_iters"]) == (1e-3, 1, 3)
    (tmp_path / "c.yaml").write_text(f"preset: gpt2\nout: {run}\n")
    one_line_error(capsys, "train", "--config", tmp_path / "c.yaml", "--resume", "true", match="different model config")


def test_a_true_false_option_given_alone_is_told_to_take_its_value(tmp_path: Path, capsys):
    """`tlm sample RUN --greedy` got argparse's bare "expected one argument"; the options taking a value of another
    kind keep it as it is."""
    for argv in (["sample", "r", "x", "--greedy"], ["train", "--resume", "--out", "r"], ["train", "--train.compile"],
                 ["experiment", "scaling", "--overwrite"]):
        option = next(a for a in argv if a.startswith("--") and a != "--out")
        one_line_error(capsys, *argv, match=f"expected one argument; give it a value: {option} true (or false)")
    assert one_line_error(capsys, "train", "--out", match="--out").endswith("argument --out: expected one argument")


def test_config_values_that_would_fail_later_are_one_line(corpus_file: Path, tmp_path: Path, capsys, monkeypatch):
    """Each of these passed the checks and then ran forever (NaN max_time), trained NaN weights (1e400 lr), or ended
    in a traceback (a seed torch cannot take, a null section, a bad torchrun environment) — some after minutes of
    preparing data; an integer written 2e6 got jsonargparse's message alone."""
    for flag, value, match in (("--train.lr", "1e400", "train.lr must be a finite number"),
                               ("--train.seed", str(2**70), "train.seed must be in"),
                               ("--train.max_tokens", "2e6", "write whole numbers in full"),
                               ("--out", str(corpus_file), "is a file")):
        one_line_error(capsys, "train", corpus_file, "--out", tmp_path / "run", flag, value, match=match)
    for yaml, match in (("train:\n  max_time: .nan\n  max_iters: null\n", "train.max_time must be"),
                        ("model: null\n", "model: in the config must be a mapping"), ("out: null\n", "out must be")):
        (tmp_path / "c.yaml").write_text(yaml)
        one_line_error(capsys, "train", corpus_file, "--out", tmp_path / "run", "--config", tmp_path / "c.yaml",
                       match=match)
    monkeypatch.setenv("WORLD_SIZE", "two")
    one_line_error(capsys, "train", corpus_file, "--out", tmp_path / "run", match="WORLD_SIZE='two'")
    assert not (tmp_path / "run").exists()


def test_help_shows_the_presets_defaults_and_info_refuses_a_run_with_a_model(trained_run: Path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "shakespeare-speedrun", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--train.lr LR Peak learning rate. (type: float, default: 0.0035)" in shown  # was the base 0.002
    with pytest.raises(SystemExit):
        main(["sample", "--help"])  # no run folder given: the help all the same
    assert "--max_new_tokens" in capsys.readouterr().out
    one_line_error(capsys, "info", trained_run, "--preset", "gpt2", match="not both")


def test_run_files_are_readable_by_others_as_the_umask_allows(trained_run: Path):
    """safetensors and mkstemp make their files 0600: a run on a shared file system was unreadable to the group."""
    mask = os.umask(0)
    os.umask(mask)
    weights = next((trained_run / "checkpoints").glob("step-*/model.safetensors"))
    for f in (weights, trained_run / "tokenizer.json", trained_run / "config.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_resume_continues_the_run_as_it_was_started(trained_run: Path, capsys):
    """`tlm train --out RUN --resume true` alone: the model and training settings are the run's own (they were the
    command-line defaults, so a run started with other flags was refused as "a different model config"), and
    flags still override them (here: a longer budget)."""
    code, out, err = tlm(capsys, "train", "--out", trained_run, "--resume", "true", "--train.max_iters", "9")
    assert code == 0, err
    assert "9 steps" in out
    steps = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "val_loss" in r] == [3, 6, 9]  # the run's eval_interval, not the default's
    assert json.loads((trained_run / "config.json").read_text())["model"]["n_layer"] == 2


def test_config_file_data_and_print_config_with_a_preset(tmp_path: Path, corpus_file: Path, capsys):
    (tmp_path / "run.yaml").write_text(f"data: {corpus_file}\ntokenizer: char\nmodel:\n  n_layer: 1\n  n_head: 2\n"
                                       "  n_embd: 16\n  block_size: 16\ntrain:\n  batch_size: 2\n  max_iters: 2\n"
                                       "  eval_batches: 1\n")
    code, _, err = tlm(capsys, "train", "--config", tmp_path / "run.yaml", "--out", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["source"] == str(corpus_file)
    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny-llama", "--print_config"])
    printed = capsys.readouterr().out
    assert "norm: rmsnorm" in printed and "mlp: swiglu" in printed


def test_sample_refuses_standard_input_that_is_not_utf8(trained_run: Path):
    proc = subprocess.run([sys.executable, "-m", "transformer_lm.cli", "sample", str(trained_run), "--max_new_tokens",
                           "3"], input=b"de\xff\xfe", capture_output=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().strip() == ("tlm: error: standard input is not UTF-8 text; convert it first "
                                            "(e.g. with iconv)")


def test_sample_into_a_closed_pipe_stops_quietly(trained_run: Path):
    """`tlm sample ... | head`: when the reader goes away, exit with 141 (SIGPIPE) and no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "transformer_lm.cli", "sample", str(trained_run), "de",
                             "--max_new_tokens", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first token is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_sample_into_an_encoding_without_its_characters_escapes_them(trained_run: Path):
    """Standard output in latin-1 (or a Windows file in cp1252) cannot hold '✓': the prompt's or a sample's such
    character was a UnicodeEncodeError traceback; it is written escaped, as Python writes them to stderr."""
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    proc = subprocess.run([sys.executable, "-m", "transformer_lm.cli", "sample", str(trained_run), "a = [b]  # ✓",
                           "--max_new_tokens", "5", "--greedy", "true"], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("latin-1").startswith("a = [b]  # \\u2713")

@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_a_settings_error_is_printed_once(capsys, monkeypatch, rank):
    """Every rank refuses the same bad setting: rank 0 alone says so (each of 8 ranks printed the same line), naming
    itself; errors that can differ between ranks (a file one node lacks) are printed by every rank."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = tlm(capsys, "info", "--model.n_embd", "30", "--model.n_head", "4")
    assert code == 2 and out == ""
    if rank == "1":
        assert err == ""
    else:
        assert err.startswith("tlm: error (rank 0 of 2): ") and err.count("\n") == 1
    code, out, err = tlm(capsys, "eval", "/nowhere", "--data", "/nowhere.txt")
    assert code == 2 and err.startswith(f"tlm: error (rank {rank} of 2): ")
