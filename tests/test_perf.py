"""perf.py: MFU and MBU against their formulas, the accelerator table found from device names, measured peaks and
bandwidth, and the bytes a decode step reads against the model's real tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from transformer_lm import perf
from transformer_lm.config import ModelConfig
from transformer_lm.decode import StaticKVCache
from transformer_lm.model import Transformer
from transformer_lm.quantize import quantize
from transformer_lm.recurrent import RecurrentLM


def test_mfu_and_mbu_are_the_formulas():
    # 6 GFLOP per token at 1000 tokens/s on a 12 TFLOP/s device: half the peak
    assert perf.mfu(6e9, 1000, 12e12) == pytest.approx(0.5)
    # GPT-2 fp32 (498 MB per token) at 40 tokens/s on 25 GB/s: 79.7%
    assert perf.mbu(498e6, 40, 25e9) == pytest.approx(498e6 * 40 / 25e9)


@pytest.mark.parametrize("device_name, chip", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"), ("NVIDIA H100 NVL", "H100-NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200-NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA L4", "L4"),
    ("Tesla V100-SXM2-32GB", "V100"), ("Tesla V100-PCIE-16GB", "V100-PCIe"), ("Tesla V100S-PCIE-32GB", "V100S-PCIe"),
    ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("NVIDIA L40S", None),
])
def test_known_accelerators_are_found_by_device_name(monkeypatch, device_name, chip):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    found = perf.known_accelerator(torch.device("cuda", 7))
    assert (found.name if found else None) == chip
    if chip is not None:
        perf.peak_flops.cache_clear()
        bf16 = perf.peak_flops(torch.device("cuda", 7), torch.bfloat16)
        assert bf16 == perf.accelerator(chip).bf16_tflops * 1e12
        perf.peak_flops.cache_clear()
    assert perf.known_accelerator(torch.device("cpu")) is None


def test_cpu_peak_and_bandwidth_are_measured_once():
    cpu = torch.device("cpu")
    peak = perf.peak_flops(cpu, torch.float32)
    assert math.isfinite(peak) and 1e8 < peak < 1e14
    assert perf.peak_flops(cpu, torch.float32) == peak  # cached, not measured again
    bandwidth = perf.copy_bandwidth(cpu, 16 * 2**20, 2)
    assert math.isfinite(bandwidth) and 1e8 < bandwidth < 1e13


class _Products(TorchDispatchMode):
    """Records each matmul op run within, with its operands' strides (their layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.seen.append((func, *(a.stride() for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def test_the_measured_peak_times_the_product_nn_linear_computes(monkeypatch):
    """The peak was timed on a @ b of two plain [n, n] operands; every matmul of a training step is an nn.Linear's
    x @ Wᵀ, and on this CPU (no bf16 units) bf16's plain product ran 13× slower than that one: a bf16 run's MFU read
    several times 100 %, and its six 1024² products held the run 30 s before its first step. The product timed must
    be nn.Linear's own: the same op on operands of the same layout, and 2n³ FLOPs over its time."""
    timed = _Products()

    def clock(fn, device, repeats):  # a stand-in for _best_time: one call, recorded, taking 1 s
        with timed:
            fn()
        return 1.0

    monkeypatch.setattr(perf, "_best_time", clock)
    assert perf.measured_matmul_flops(torch.device("cpu"), torch.float32, n=64) == 2 * 64**3
    linear = _Products()
    with linear, torch.no_grad():
        torch.nn.Linear(64, 64, bias=False)(torch.randn(64, 64))
    assert timed.seen == linear.seen and len(linear.seen) == 1


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields a tied matrix once


def test_weight_bytes_are_the_parameters_a_step_reads():
    rope_tied = Transformer(ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                        pos_encoding="rope"))
    assert perf.weight_bytes(rope_tied) == _param_bytes(rope_tied)  # every weight is read by a matmul

    learned = Transformer(ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16))
    # the position table is looked up, one row per token
    assert perf.weight_bytes(learned) == _param_bytes(learned) - 15 * 16 * 4

    untied = Transformer(ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                     pos_encoding="rope", tie_embeddings=False))
    # the token table is only looked up; the separate head matrix is read whole
    assert perf.weight_bytes(untied) == _param_bytes(untied) - 99 * 16 * 4

    q = quantize(Transformer(rope_tied.config), 8)
    stored = sum(t.numel() * t.element_size() for t in [*q.parameters(), *q.buffers()])
    assert perf.weight_bytes(q) == stored < _param_bytes(rope_tied)


def test_decode_bytes_add_the_kv_cache_read():
    config = ModelConfig(vocab_size=100, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                         pos_encoding="rope")
    model = Transformer(config)
    cache = StaticKVCache(config, batch_size=4, max_len=40)
    kv = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert perf.kv_cache_bytes(config, 40, 4) == kv
    assert perf.decode_bytes_per_token(model, config, 40, 4) == pytest.approx((_param_bytes(model) + kv) / 4)


def test_a_sliding_window_caps_the_kv_cache_read():
    """A query of a sliding-window model (Mistral) attends to its last `sliding_window` keys: a decode step needs
    those keys and values, whatever the context (accounting.flops_per_token charges only their attention). The
    whole context's were counted: Mistral-7B's MBU at 32k positions 1.25x too high."""
    config = ModelConfig(vocab_size=100, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                         pos_encoding="rope", sliding_window=8)
    model = Transformer(config)

    def held(slots: int) -> int:  # the real tensors of a cache of that many positions
        cache = StaticKVCache(config, batch_size=4, max_len=slots)
        return cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()

    for context, read in ((40, 8), (8, 8), (5, 5)):
        assert perf.decode_bytes_per_token(model, config, context, 4) == pytest.approx((_param_bytes(model)
                                                                                        + held(read)) / 4)


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_a_recurrent_models_decode_bytes_add_its_state_not_a_kv_cache(arch):
    """A recurrent step reads its state after the last position, the same at any context: the --verbose MBU of an
    LSTM counted a KV cache it does not have (4 layers of 128 at 255 positions: 1.04 MB on 2.16 MB of weights)."""
    config = ModelConfig(vocab_size=100, block_size=64, n_layer=3, n_embd=32, arch=arch)
    model = RecurrentLM(config)
    cache = model.make_cache(4, max_len=40)
    state = [t[cache.max_len - 1] for t in (cache.h, cache.c) if t is not None]  # one position's, every layer
    read = sum(t.numel() * t.element_size() for t in state)
    for context in (1, 40):
        assert perf.decode_bytes_per_token(model, config, context, 4) == pytest.approx((_param_bytes(model) + read) / 4)
