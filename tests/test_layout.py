"""The decode-time weight layout (layout.py): transposed linear layers give the original model's logits and greedy
tokens, keep a tied head tied without a second copy, apply only where they pay off, and compose with quantize().
CPU, no timing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import conftest
from transformer_lm.config import ModelConfig
from transformer_lm.generate import generate, generate_batch
from transformer_lm.layout import TransposedEmbedding, TransposedLinear, decode_layout, transpose_linears
from transformer_lm.model import Transformer
from transformer_lm.perf import weight_bytes
from transformer_lm.quantize import Int8Embedding, Int8Linear, quantize

VARIANTS = {"gpt2": dict(pos_encoding="learned"),  # tied head, biases
            "llama": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", n_kv_head=2, bias=False,
                          tie_embeddings=False)}


def random_model(variant: str, seed: int = 0) -> Transformer:
    """Weights far from GPT-2's 0.02 init, so that logits are not near-flat and a wrong transpose shows."""
    config = ModelConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_embd=32, **VARIANTS[variant])
    return conftest.random_model(config, seed)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transposed_model_has_the_original_logits_and_greedy_tokens(variant):
    model = random_model(variant)
    swapped = transpose_linears(copy.deepcopy(model))
    assert not any(type(m) is nn.Linear for m in swapped.modules())
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):  # same values, stored [in, out] and contiguous
            t = swapped.get_submodule(name)
            assert isinstance(t, TransposedLinear) and t.weight_t.is_contiguous()
            assert torch.equal(t.weight_t, m.weight.T)
    idx = torch.randint(0, 61, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(swapped(idx).logits, model(idx).logits, atol=1e-5, rtol=1e-5)
    prompt = idx[0, :5].tolist()
    greedy = list(generate(model, prompt, 30, temperature=0))
    assert list(generate(swapped, prompt, 30, temperature=0)) == greedy and len(set(greedy)) > 1
    prompts = [idx[1, :3].tolist(), idx[2, :7].tolist()]  # left-padded batch: key mask and per-row positions
    assert generate_batch(swapped, prompts, 12) == generate_batch(model, prompts, 12)
    assert weight_bytes(swapped) == weight_bytes(model)  # nothing duplicated, nothing lost


def test_a_tied_head_stays_tied_and_is_held_once():
    model = random_model("gpt2")
    swapped = transpose_linears(copy.deepcopy(model))
    assert isinstance(swapped.tok_emb, TransposedEmbedding) and swapped.tok_emb.weight_t is swapped.lm_head.weight_t
    assert sum(p.numel() for p in swapped.parameters()) == model.num_params()
    idx = torch.tensor([[0, 5, 60, 5]])
    torch.testing.assert_close(swapped.tok_emb(idx), model.tok_emb(idx), atol=0, rtol=0)


def test_decode_layout_applies_only_to_float32_on_cpu():
    assert isinstance(decode_layout(random_model("gpt2")).lm_head, TransposedLinear)
    bf16 = random_model("gpt2").to(torch.bfloat16)
    assert type(decode_layout(bf16).lm_head) is nn.Linear  # bf16: nn.Linear's layout is the faster one here


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantizing_a_transposed_model_equals_quantizing_the_original(variant):
    model = random_model(variant)
    a = quantize(copy.deepcopy(model), 8)
    b = quantize(transpose_linears(copy.deepcopy(model)), 8)
    for (name, ma), mb in zip(a.named_modules(), b.modules()):
        assert type(ma) is type(mb), name
        if isinstance(ma, Int8Linear):
            assert torch.equal(ma.weight, mb.weight) and torch.equal(ma.scales, mb.scales), name
            assert mb.weight.is_contiguous(), name  # row-major, as the fused int8 kernel reads it
    if variant == "gpt2":
        assert isinstance(b.tok_emb, Int8Embedding) and b.tok_emb.weight is b.lm_head.weight
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(b(idx).logits, a(idx).logits, atol=1e-5, rtol=1e-5)
