"""GPU paths: bf16/fp16 autocast training, torch.compile, and GPU-vs-CPU agreement. Run with `pytest -m gpu` on a
machine with CUDA; the default run deselects them (see pyproject.toml), and without CUDA they fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformer_lm.api import load_run
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.generate import generate
from transformer_lm.loss import linear_cross_entropy
from transformer_lm.model import Transformer
from transformer_lm.train import read_metrics, train
from transformer_lm.train_data import training_data

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    assert torch.cuda.is_available(), "these tests need a CUDA device (run without -m gpu on CPU-only machines)"


@pytest.mark.parametrize("dtype,compile", [("bfloat16", False), ("bfloat16", True), ("float16", False)])
def test_autocast_training_on_gpu(dtype: str, compile: bool, corpus_file: Path, tmp_path: Path):
    data = training_data(corpus_file, "byte")
    cfg = TrainConfig(batch_size=16, max_iters=80, eval_interval=80, eval_batches=2, log_interval=10, lr=3e-3,
                      warmup_iters=10, device="cuda", dtype=dtype, compile=compile)
    res = train(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64), cfg, data, tmp_path / "run",
                progress=False)
    curve = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert curve[-1] < 0.6 * curve[0] and res.val.loss < curve[0]
    run = load_run(tmp_path / "run", "cuda")
    assert run.model.tok_emb.weight.is_cuda and isinstance(run.generate("def ", max_new_tokens=10, seed=0), str)


@pytest.mark.parametrize("quantized", [None, "int4:32"], ids=["lora", "qlora"])
def test_lora_fine_tuning_in_bf16_on_gpu(corpus_file: Path, tmp_path: Path, quantized: str | None):
    """A LoRA fine-tune on CUDA under bf16 autocast (the frozen base held in bf16, lora.hold_base_in; or QLoRA's,
    quantized in host memory and moved over) learns, and its merged checkpoint loads as a plain model."""
    data = training_data(corpus_file, "byte")
    base = TrainConfig(batch_size=16, max_iters=40, eval_interval=40, eval_batches=2, lr=3e-3, warmup_iters=5,
                       device="cuda")
    model = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
    train(model, base, data, tmp_path / "base", progress=False)
    cfg = TrainConfig(batch_size=16, max_iters=40, eval_interval=40, eval_batches=2, log_interval=1, lr=1e-2,
                      warmup_iters=5, device="cuda", dtype="bfloat16", init_from=str(tmp_path / "base"), lora_rank=8,
                      lora_quantize=quantized)
    train(model, cfg, data, tmp_path / "lora", progress=False)
    curve = [r["loss"] for r in read_metrics(tmp_path / "lora" / "metrics.jsonl") if "loss" in r]
    assert curve[-1] < curve[0]
    run = load_run(tmp_path / "lora", "cuda")
    assert run.model.blocks[0].attn.qkv.weight.dtype == torch.float32 and isinstance(run.generate("def ", seed=0), str)


def test_gpu_and_cpu_greedy_agree():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64, n_kv_head=2,
                         pos_encoding="rope")
    cpu = Transformer(config).init_weights(0).eval()
    with torch.no_grad():  # sharpen the distribution so that fp32 reduction-order differences cannot flip argmax
        cpu.lm_head.weight.mul_(20)
    gpu = Transformer(config).to("cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    prompt = [1, 5, 9, 2]
    a = list(generate(cpu, prompt, 40, temperature=0))
    b = list(generate(gpu, prompt, 40, temperature=0))
    assert a == b
    x = torch.randint(0, 97, (2, 64))
    torch.testing.assert_close(gpu(x.cuda()).logits.cpu(), cpu(x).logits, atol=1e-3, rtol=1e-3)


def test_cuda_graphed_decode_equals_eager():
    """--compile on CUDA records the decode step as a CUDA graph: the cache it updates in place keeps its addresses,
    so replays see every step's keys, and greedy ids equal the eager loop's, also across two generations."""
    from transformer_lm.generate import generate_batch

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64, pos_encoding="rope")
    model = Transformer(config).init_weights(seed=0).cuda().eval()
    for prompt in ([1, 2, 3, 4, 5], [7, 8]):
        eager = list(generate(model, prompt, 24, temperature=0.0))
        assert list(generate(model, prompt, 24, temperature=0.0, compile=True)) == eager
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate_batch(model, prompts, 12, compile=True) == generate_batch(model, prompts, 12)


@pytest.mark.parametrize("vocab", [97, 50257])  # a short row and a GPT-2 row: CUDA's softmax kernels differ by length
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_head_loss_equals_the_plain_loss_on_gpu(vocab: int, autocast: bool, device: str = "cuda"):
    """loss.py overwrites its logits buffer in place (log-softmax into itself, then softmax, then the gradient): on
    CUDA's kernels too, the loss and the gradients must equal F.cross_entropy's through autograd."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(300, 64, device=device, generator=gen).requires_grad_()
    w = (torch.randn(vocab, 64, device=device, generator=gen) * 0.5).requires_grad_()
    t = torch.randint(0, vocab, (300,), device=device, generator=gen)
    t[::7] = -1
    results = []
    for fn in (lambda: F.cross_entropy(F.linear(x, w).float(), t, ignore_index=-1),
               lambda: linear_cross_entropy(x, w, None, t)):
        x.grad = w.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        loss.backward()
        results.append((loss.detach(), x.grad.clone(), w.grad.clone()))
    tolerance = dict(atol=2e-3, rtol=2e-2) if autocast else dict(atol=1e-4, rtol=1e-3)  # TF32 may be on for fp32
    for plain, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, **tolerance)


def test_batched_decoding_on_cuda_gives_generates_ids():
    """The continuous batcher (tlm serve's) on CUDA, eager and CUDA-graphed: rows at their own positions, joining
    and packing, give what generate() gives each prompt alone."""
    from transformer_lm.batching import Batcher

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64, pos_encoding="rope")
    model = Transformer(config).init_weights(seed=0).cuda().eval()
    with torch.no_grad():  # sharpen the distribution: batched and single-row reductions may differ in the last bits
        model.lm_head.weight.mul_(20)
    prompts, lengths = [[1, 2, 3], [7], [4, 5, 6, 7, 8]], [40, 9, 20]
    expected = [list(generate(model, p, n, temperature=0.0)) for p, n in zip(prompts, lengths)]
    for compile in (False, True):
        batcher = Batcher(model, rows=2, compile=compile)
        streams = [batcher.submit(p, n, temperature=0.0) for p, n in zip(prompts, lengths)]
        assert [list(s) for s in streams] == expected, f"compile={compile}"
