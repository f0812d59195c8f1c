"""QLoRA (train.lora_quantize): LoRA over frozen weights held quantized (quantize.py's int8 / int4). The adapted
layer's output and gradients equal those of LoRA over a float layer holding the dequantized weights (the naive
reference) while autograd keeps no float copy of the weight; a fine-tune starts from the quantized model's loss,
checkpoints the dequantized base plus the update, and resumes exactly; the memory plan counts the base's bits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_corpus
from transformer_lm.api import load_run, read_run_config
from transformer_lm.checkpoint import latest_checkpoint, load_state
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.errors import ConfigError
from transformer_lm.lora import LoRALinear, quantize_base
from transformer_lm.quantize import Int4Linear, Int8Linear
from transformer_lm.train import read_metrics, train
from transformer_lm.train_data import training_data
from transformer_lm.windows import BatchSampler

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_iters=6, eval_interval=6, eval_batches=2, log_interval=1, warmup_iters=2, lr=1e-2)
    return TrainConfig(**{**base, **kw})


def _quantized_and_float(quantized) -> tuple[nn.Module, nn.Linear]:
    """A seeded 64 -> 96 layer quantized by `quantized`, and a float layer holding its dequantized weight (the
    naive reference)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    q = quantized(linear)
    reference = nn.Linear(64, 96)
    with torch.no_grad():
        reference.weight.copy_(q.dequantize())
        reference.bias.copy_(linear.bias)
    return q, reference


@pytest.mark.parametrize("quantized", [Int8Linear, lambda linear: Int4Linear(linear, 16)], ids=["int8", "int4"])
def test_an_adapted_quantized_layer_is_its_dequantized_float_layer(quantized):
    q, reference = _quantized_and_float(quantized)
    torch.manual_seed(1)
    ours = LoRALinear(q, 4, 8.0)
    torch.manual_seed(1)
    theirs = LoRALinear(reference, 4, 8.0)
    with torch.no_grad():
        ours.lora_b.normal_()
        theirs.lora_b.copy_(ours.lora_b)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ours(x)
    y2 = theirs(x2)
    (y * y2.detach().cos()).sum().backward()
    (y2 * y2.detach().cos()).sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for name in ("lora_a", "lora_b"):
        assert torch.allclose(getattr(ours, name).grad, getattr(theirs, name).grad, rtol=1e-4, atol=1e-5)
    assert not any(t.shape in ((96, 64), (64, 96)) for t in saved)  # no float copy of the weight kept
    assert torch.allclose(ours.merged_weight(), theirs.merged_weight())



def test_under_bf16_autocast_the_backward_runs_in_bf16_and_agrees():
    """The backward's product in the forward's autocast precision: x's gradient within bf16's rounding of the
    float layer's under the same autocast, and float32 as x is."""
    q, reference = _quantized_and_float(Int8Linear)
    grads = []
    for layer in (LoRALinear(q, 4, 8.0), LoRALinear(reference, 4, 8.0)):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16):
            layer(x).float().square().sum().backward()
        grads.append(x.grad)
    assert grads[0].dtype == torch.float32
    assert torch.allclose(grads[0], grads[1], rtol=2e-2, atol=2e-2 * float(grads[1].abs().max()))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    corpus = tmp_path / "base.txt"
    corpus.write_text(make_corpus(seed=0))
    train(ModelConfig(**SMALL), _cfg(max_iters=40, eval_interval=40, lr=3e-3), training_data(corpus, "byte"),
          tmp_path / "base", progress=False)
    return tmp_path / "base"


@pytest.mark.parametrize("spec, bits, group", [("int8", 8, 128), ("int4:16", 4, 16)])
def test_a_qlora_fine_tune_trains_the_quantized_model(base: Path, tmp_path: Path, spec: str, bits: int, group: int):
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=5))
    _, model_cfg = read_run_config(base)
    data = training_data(other, load_run(base, "cpu").tokenizer)
    cfg = _cfg(init_from=str(base), lora_rank=4, lora_alpha=8.0, lora_quantize=spec, max_iters=8, eval_interval=4)
    full = train(model_cfg, cfg, data, tmp_path / "full", progress=False)
    quantized = load_run(base, "cpu").model
    quantize_base(quantized, bits, group)  # the reference: the base quantized alone, before any step
    x, y = BatchSampler(data.train, cfg.batch_size, model_cfg.block_size, seed=cfg.seed).next()
    with torch.no_grad():
        logits = quantized.train()(x).logits
    first = next(r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r.get("step") == 1)
    assert first == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), y.flatten())), rel=1e-5)
    losses = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    state = load_state(latest_checkpoint(tmp_path / "full"))  # merged: the dequantized base plus the update
    a, b = state["lora"]["blocks.1.attn.qkv.lora_a"], state["lora"]["blocks.1.attn.qkv.lora_b"]
    tuned = load_run(tmp_path / "full", "cpu").model.blocks[1].attn.qkv.weight
    assert torch.allclose(tuned, quantized.blocks[1].attn.qkv.dequantize() + 2.0 * b @ a, atol=1e-6)
    train(model_cfg, cfg, data, tmp_path / "half", progress=False, stop_at=6)
    resumed = train(model_cfg, cfg, data, tmp_path / "half", resume=True, progress=False)
    assert resumed.val.loss == full.val.loss


def test_the_memory_plan_counts_the_bases_bits(capsys):
    from transformer_lm.experiments.memory import matmul_weights, plan_memory, quantized_bytes

    config = ModelConfig.from_preset("gpt2")
    assert main(["memory", "--preset", "gpt2", "--lora_rank", "8", "--lora_quantize", "int4", "--json", "true"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert list(plans) == ["DDP+QLoRA", "DDP+QLoRA+AC"]
    blocks = matmul_weights(config) - config.vocab_size * config.n_embd
    half = plan_memory(config, 1, world_size=8, trained=1, base_bytes=2)
    four = plan_memory(config, 1, world_size=8, trained=1, base_bytes=quantized_bytes(config, 4, 128))
    assert half.weights - four.weights == round((2 - 0.5625) * blocks)
    assert main(["memory", "--preset", "gpt2", "--lora_rank", "8", "--lora_targets", "[qkv]", "--json", "true"]) == 0
    from transformer_lm.lora import lora_params

    only_qkv = json.loads(capsys.readouterr().out)["plans"]["DDP+LoRA"]
    assert only_qkv["optimizer"] == 8 * lora_params(config, 8, ["qkv"]) == 8 * 12 * 8 * (768 + 3 * 768)
    assert main(["memory", "--preset", "gpt2", "--lora_rank", "8", "--lora_quantize", "w8a8"]) == 2
    assert "train.lora_quantize holds LoRA's frozen weights as int8, int4" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="with train.lora_rank > 0"):
        TrainConfig(init_from="x", lora_quantize="int8")
