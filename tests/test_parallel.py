"""`parallelize` in one process: activation checkpointing leaves gradients unchanged, and a torch.compile that does
not work falls back to eager training with one warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.errors import ConfigError
from transformer_lm.model import Transformer, build_model
from transformer_lm.parallel import DistInfo, parallelize
from transformer_lm.train import read_metrics, train
from transformer_lm.train_data import training_data

MODEL = dict(vocab_size=64, n_layer=3, n_head=2, n_embd=32, block_size=16)


@pytest.mark.parametrize("variant", [{}, {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1}])
def test_activation_checkpointing_keeps_gradients(variant: dict):
    """Dropout on: the recomputed forward must draw the same masks (the wrapper restores the RNG state)."""
    config = ModelConfig(**MODEL, **variant, dropout=0.2)
    plain = Transformer(config).init_weights(0)
    wrapped = Transformer(config).init_weights(0)
    keys = list(wrapped.state_dict())
    forward = parallelize(wrapped, DistInfo(), TrainConfig(activation_checkpointing=True, device="cpu"))
    assert list(wrapped.state_dict()) == keys  # checkpoints do not depend on the setting
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.blocks)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model, fwd in ((plain, plain), (wrapped, forward)):
        model.train()
        torch.manual_seed(5)
        loss = fwd(x, x.roll(-1, 1)).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in wrapped.named_parameters():
        want = grads[name.replace("_checkpoint_wrapped_module.", "")]
        assert torch.allclose(p.grad, want, rtol=0, atol=1e-6), name


def test_activation_checkpointing_needs_blocks():
    model = build_model(ModelConfig(arch="lstm", vocab_size=64, n_layer=1, n_embd=16, block_size=8))
    with pytest.raises(ConfigError, match="recurrent"):
        parallelize(model, DistInfo(), TrainConfig(activation_checkpointing=True, device="cpu"))


def test_compile_that_fails_trains_eagerly_with_one_warning(corpus_file: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture):
    data = training_data(corpus_file, "char")
    cfg = dict(batch_size=4, max_iters=3, warmup_iters=1, eval_interval=3, eval_batches=1, log_interval=1, device="cpu")
    model = ModelConfig(**{**MODEL, "dropout": 0.0})
    train(model, TrainConfig(**cfg), data, tmp_path / "eager", progress=False)

    def unavailable(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python\nsecond line")

    monkeypatch.setattr(torch, "compile", unavailable)
    with caplog.at_level(logging.WARNING, logger="transformer_lm"):
        train(model, TrainConfig(**cfg, compile=True), data, tmp_path / "compiled", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "torch.compile does not work here (RuntimeError: Dynamo is not supported" in warnings[0]
    assert "eagerly" in warnings[0] and "second line" not in warnings[0]
    want, got = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("eager", "compiled"))
    assert [r.get("loss") for r in got] == [r.get("loss") for r in want]
