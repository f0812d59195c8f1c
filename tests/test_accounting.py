"""Closed-form compute and memory against measurements of the built model.

FLOPs are measured with torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs per multiply-add of every
mm/addmm/bmm (the same convention as `flops_per_token`) and nothing for element-wise ops, softmax or embedding
lookups. Its SDPA formula counts the full QKᵀ and AV products (no causal halving, like ours), but it is registered
only for the flash/efficient/cuDNN kernels: on CPU, F.scaled_dot_product_attention dispatches to
`_scaled_dot_product_flash_attention_for_cpu`, which it does not know, so the SDPA path's attention counts 0.
Hence the exact comparison runs the eager attention path (`return_attentions=True`: explicit QKᵀ and AV matmuls),
and the SDPA path is checked per category: it must measure exactly forward - attention_forward.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from transformer_lm.accounting import count_params, flops_per_token, prefill_flops_per_token, training_memory
from transformer_lm.config import ModelConfig, preset
from transformer_lm.decode import StaticKVCache, prefill
from transformer_lm.model import Transformer

CONFIGS = {
    "gpt2-like": dict(),
    "llama-like": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "gqa": dict(pos_encoding="rope", mlp="swiglu", n_kv_head=2),
    "mqa-untied": dict(n_kv_head=1, tie_embeddings=False, d_ff=40),
}


def make_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32), **overrides})


def measure(model: Transformer, idx: torch.Tensor, *, eager: bool, backward: bool) -> int:
    """Total FLOPs FlopCounterMode sees for one forward (and backward) pass over idx."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(idx, targets=idx if backward else None, return_attentions=eager)
        if backward:
            out.loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seq_len", [None, 8])
def test_flops_per_token_matches_flop_counter(name, seq_len):
    config = make_config(**CONFIGS[name])
    model = Transformer(config).init_weights(seed=0)
    T = seq_len or config.block_size
    B = 2
    idx = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    predicted = flops_per_token(config, seq_len)
    tokens = B * T

    # Eager attention: every matmul is visible, so the whole forward matches exactly.
    assert measure(model, idx, eager=True, backward=False) == tokens * predicted["forward"]
    # SDPA path on CPU: everything except the attention matmuls (see the module docstring).
    assert measure(model, idx, eager=False, backward=False) == tokens * (predicted["forward"]
                                                                          - predicted["attention_forward"])
    # Attention per token: QKᵀ and AV, each T·head_dim multiply-adds per head per layer, 2 FLOPs each.
    assert predicted["attention_forward"] == 2 * 2 * config.n_layer * config.n_head * T * config.head_dim
    # Training: the backward of every matmul is two matmuls of the same size (input and weight gradients), so
    # forward + backward is 3 x forward; measured on the eager path it is exact.
    assert predicted["train"] == 3 * predicted["forward"]
    model.zero_grad(set_to_none=True)
    assert measure(model, idx, eager=True, backward=True) == tokens * predicted["train"]


def test_a_sliding_window_caps_the_attention_term():
    """Each query attends to at most `sliding_window` keys (Mistral): the term is charged at min(T, window), which
    the eager path's masked full product hides from FlopCounterMode, so it is checked against the formula."""
    for T, window in ((16, 4), (16, 16), (8, 12)):
        c, full = make_config(sliding_window=window), make_config()
        got, plain = flops_per_token(c, T), flops_per_token(full, T)
        assert got["attention_forward"] == 2 * 2 * c.n_layer * c.n_head * min(T, window) * c.head_dim
        assert got["forward"] - got["attention_forward"] == plain["forward"] - plain["attention_forward"]
    mistral = ModelConfig(**{**preset("mistral-7b"), "block_size": 32768})
    ratio = flops_per_token(mistral)["forward"] / flops_per_token(ModelConfig(**{**mistral.to_dict(),
                                                                               "sliding_window": None}))["forward"]
    assert 0.5 < ratio < 0.55  # 32k keys were charged where 4096 are attended: 1.9x overstated


def test_flops_per_token_weight_term_is_twice_the_matmul_weights():
    """Independent of the counter: 2 FLOPs per weight of every matmul = 2 × (non-embedding parameters minus biases
    and norm gains, plus the LM head). For the GPT-2 preset's 124M model that is the familiar ≈ 2N rule."""
    config = ModelConfig.from_preset("gpt2")
    with torch.device("meta"):
        model = Transformer(config)
    matmul_weights = sum(p.numel() for name, p in model.named_parameters()
                         if p.ndim == 2 and not name.startswith(("tok_emb", "pos_emb")))
    matmul_weights += config.vocab_size * config.n_embd  # the LM head, tied to tok_emb, is still a matmul
    f = flops_per_token(config)
    assert f["forward"] - f["attention_forward"] == 2 * matmul_weights
    assert f["attention_forward"] == 4 * 12 * 1024 * 768


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_memory_is_sixteen_bytes_per_param(name):
    config = make_config(**CONFIGS[name])
    n = Transformer(config).num_params()  # measured, not the formula
    assert count_params(config).total == n
    mem = training_memory(config)
    assert mem == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, "total": 16 * n}
    half = training_memory(config, param_bytes=2, grad_bytes=2)
    assert half["total"] == n * (2 + 2 + 8)
    assert half["optimizer"] == 8 * n  # AdamW moments stay fp32


def test_training_memory_gpt2():
    # 124,439,808 parameters × 16 bytes
    assert training_memory(ModelConfig.from_preset("gpt2"))["total"] == 124_439_808 * 16


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2, "mlp": "swiglu", "pos_encoding": "rope"}])
def test_prefill_flops_count_what_a_prefill_runs(overrides):
    """A prefill's FLOPs against the matmuls a real one runs (FlopCounterMode; it does not see SDPA's on a CPU, so the
    attention is added by hand: every query over the whole prompt in the first blocks, the last query alone in the
    last): every block at every position but the last block, which runs its Q/K/V projection at every position and
    the rest at the last one only, as the LM head."""
    config = ModelConfig(vocab_size=500, n_layer=3, n_head=4, n_embd=64, block_size=128, **overrides)
    model = Transformer(config).init_weights(seed=0).eval()
    T = 100
    idx = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        prefill(model, StaticKVCache(config, 1, T), idx)
    matmuls = counter.get_total_flops()
    attention = 2 * 2 * (config.n_layer - 1) * T * T * config.n_embd + 2 * 2 * T * config.n_embd
    assert prefill_flops_per_token(config, T) == pytest.approx((matmuls + attention) / T)
    block = sum(2 * m.in_features * m.out_features for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    head = 2 * config.vocab_size * config.n_embd
    assert matmuls < config.n_layer * T * block + head  # the last block really skipped its other positions
