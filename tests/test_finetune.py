"""Fine-tuning (`train.init_from`): a run started from another run's weights, on other text. The reference for its
start is the base model itself: the first step's logged loss is the base model's loss on that step's batch (a
random start's is ~ln(vocab)); the model config and tokenizer are the base run's (an imported model's padded
embedding table and chat template included); what cannot be fine-tuned so is refused in one line, before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_corpus, random_model
from transformer_lm.api import load_run, read_run_config
from transformer_lm.chat import CHAT_TEMPLATE_FILE
from transformer_lm.checkpoint import save_checkpoint
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig, dump_json
from transformer_lm.data import BatchSampler
from transformer_lm.errors import CheckpointError, ConfigError
from transformer_lm.tokenizers import BPETokenizer, save_tokenizer
from transformer_lm.train import read_metrics, train, training_data

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_iters=6, eval_interval=6, eval_batches=2, log_interval=1, warmup_iters=2, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def _first_loss(run: Path) -> float:
    return next(r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("step") == 1)


def _loss_on_first_batch(model, data, cfg: TrainConfig, block: int) -> float:
    x, y = BatchSampler(data.train, cfg.batch_size, block, seed=cfg.seed, vocab_size=model.config.vocab_size).next()
    with torch.no_grad():
        return float(model.train()(x, y).loss)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A byte-level run trained a little on Python-looking text."""
    corpus = tmp_path / "base.txt"
    corpus.write_text(make_corpus(seed=0))
    train(ModelConfig(**SMALL), _cfg(max_iters=60, eval_interval=60, lr=3e-3), training_data(corpus, "byte"),
          tmp_path / "base", progress=False)
    return tmp_path / "base"


def test_a_fine_tune_starts_from_the_base_runs_weights(base: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    _, model_cfg = read_run_config(base)
    cfg = _cfg(init_from=str(base))
    data = training_data(other, load_run(base, "cpu").tokenizer)
    result = train(model_cfg, cfg, data, tmp_path / "ft", progress=False)
    reference = _loss_on_first_batch(load_run(base, "cpu").model, data, cfg, model_cfg.block_size)
    assert _first_loss(tmp_path / "ft") == pytest.approx(reference, rel=1e-5)
    fresh = train(model_cfg, _cfg(), data, tmp_path / "fresh", progress=False)
    assert _first_loss(tmp_path / "ft") < _first_loss(tmp_path / "fresh") - 1  # a random start: ~ln(256) = 5.5
    assert result.val.loss < fresh.val.loss
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(base) and saved["model"] == model_cfg.to_dict()
    assert load_run(tmp_path / "ft", "cpu").step == 6


def test_the_cli_takes_the_base_runs_model_and_tokenizer_and_resumes(base: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    ft = tmp_path / "ft"
    args = ["train", str(other), "--out", str(ft), "--train.init_from", str(base), "--train.batch_size", "4",
            "--train.eval_interval", "2", "--train.eval_batches", "2", "--train.log_interval", "1",
            "--model.dropout", "0.1"]
    assert main([*args, "--train.max_iters", "2"]) == 0
    saved = json.loads((ft / "config.json").read_text())
    _, base_cfg = read_run_config(base)
    assert saved["model"] == {**base_cfg.to_dict(), "dropout": 0.1} and saved["preset"] is None
    assert (ft / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert main(["train", "--out", str(ft), "--resume", "true", "--train.max_iters", "4"]) == 0
    assert load_run(ft, "cpu").step == 4


@pytest.mark.parametrize("args, message", [
    (["--model.n_layer", "3"], "fields differ: n_layer 2 -> 3"),
    (["--model.rope_theta", "500.0"], "fields differ: rope_theta"),
    (["--tokenizer", "char"], "--tokenizer char: a fine-tune tokenizes its data with the tokenizer of"),
])
def test_what_a_fine_tune_cannot_change_is_refused(base: Path, tmp_path: Path, capsys, args, message):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    assert main(["train", str(other), "--out", str(tmp_path / "ft"), "--train.init_from", str(base), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_a_base_that_is_no_run_or_data_of_another_tokenizer_is_refused(base: Path, tmp_path: Path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["train", str(other), "--out", str(tmp_path / "ft"), "--train.init_from", str(hf)]) == 2
    assert "import it first: tlm convert" in capsys.readouterr().err
    _, model_cfg = read_run_config(base)
    with pytest.raises(ConfigError, match="tokenized otherwise than train.init_from"):
        train(model_cfg, _cfg(init_from=str(base)), training_data(other, "char"), tmp_path / "ft", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(dump_json({"model": model_cfg.to_dict()}))
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        train(model_cfg, _cfg(init_from=str(empty)), training_data(other, "byte"), tmp_path / "ft", progress=False)


def test_an_imported_models_padded_table_and_chat_template_are_kept(tmp_path: Path):
    """An imported model's embedding table may have more rows than its tokenizer has ids (Qwen2's 151,936 for
    151,665): a fine-tune keeps the table as it is, and the chat template with it."""
    tokenizer = BPETokenizer.train(make_corpus(), vocab_size=300)
    config = ModelConfig(**{**SMALL, "pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
                         vocab_size=tokenizer.vocab_size + 12, tie_embeddings=False)
    base = tmp_path / "imported"
    base.mkdir()
    (base / "config.json").write_text(dump_json({"model": config.to_dict(), "source": {"format": "huggingface"}}))
    save_tokenizer(tokenizer, base / "tokenizer.json")
    (base / CHAT_TEMPLATE_FILE).write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    save_checkpoint(base, random_model(config), {}, 0)
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    assert main(["train", str(other), "--out", str(tmp_path / "ft"), "--train.init_from", str(base),
                 "--train.max_iters", "2", "--train.batch_size", "2", "--train.eval_interval", "2",
                 "--train.eval_batches", "1", "--model.block_size", "8"]) == 0
    run = load_run(tmp_path / "ft", "cpu")
    assert run.model.config.vocab_size == tokenizer.vocab_size + 12 and run.model.config.block_size == 8
    assert run.chat_template == (base / CHAT_TEMPLATE_FILE).read_text()
    assert isinstance(run.chat([{"role": "user", "content": "def "}], max_new_tokens=3, seed=0), str)
