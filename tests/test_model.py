"""The model against independent references: naive attention, the paper's sinusoid, RoPE's algebra, closed-form
parameter counts and initialization statistics (the KV cache and sampling: test_generate.py). Everything runs on CPU
in float32 and downloads nothing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model
from transformer_lm.accounting import count_params
from transformer_lm.config import ModelConfig
from transformer_lm.errors import ConfigError
from transformer_lm.generate import generate
from transformer_lm.model import FeedForward, KVCache, Transformer, apply_rope, rope_cos_sin, sinusoidal_encoding

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none")


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return ModelConfig(**{**base, **overrides})


def random_ids(config: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# 1. Attention against a naive reference


def reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE written from the definition, in float64: for position p and pair i (i, i + d/2) the angle is
    p * theta^(-2i/d). x is (B, H, T, d)."""
    *_, T, d = x.shape
    half = d // 2
    out = x.clone()
    for p in range(T):
        for i in range(half):
            a = p * theta ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[..., p, i], x[..., p, i + half]
            out[..., p, i] = x1 * c - x2 * s
            out[..., p, i + half] = x1 * s + x2 * c
    return out


def naive_attention(attn, x: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ/√d)·V head by head, in float64, from the layer's own fused qkv weights. Query head h reads K/V head
    h // (n_head / n_kv_head). Returns (output after the projection, weights (B, nh, T, T))."""
    B, T, C = x.shape
    nh, nkv, hd = config.n_head, config.kv_heads, config.head_dim
    W = attn.qkv.weight.double()
    b = attn.qkv.bias.double() if attn.qkv.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    xd = x.double()

    def head(row0: int) -> torch.Tensor:  # (B, T, hd) from weight rows [row0, row0 + hd)
        return xd @ W[row0:row0 + hd].T + b[row0:row0 + hd]

    qs = torch.stack([head(h * hd) for h in range(nh)], dim=1)  # (B, nh, T, hd)
    ks = torch.stack([head(nh * hd + g * hd) for g in range(nkv)], dim=1)  # (B, nkv, T, hd)
    vs = torch.stack([head((nh + nkv) * hd + g * hd) for g in range(nkv)], dim=1)
    if config.pos_encoding == "rope":
        qs, ks = reference_rope(qs, config.rope_theta), reference_rope(ks, config.rope_theta)
    future = torch.tensor([[j > i for j in range(T)] for i in range(T)])
    outs, weights = [], []
    for h in range(nh):
        g = h // (nh // nkv)
        scores = qs[:, h] @ ks[:, g].transpose(-1, -2) / math.sqrt(hd)  # (B, T, T)
        w = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        weights.append(w)
        outs.append(w @ vs[:, g])  # (B, T, hd)
    y = torch.cat(outs, dim=-1)  # heads side by side: (B, T, C)
    y = y @ attn.proj.weight.double().T
    if attn.proj.bias is not None:
        y = y + attn.proj.bias.double()
    return y, torch.stack(weights, dim=1)


def capture_attention_io(model: Transformer, idx: torch.Tensor, **kwargs):
    """Run model(idx) and record every attention layer's input and output through forward hooks."""
    records = []
    hooks = [b.attn.register_forward_hook(lambda mod, args, out: records.append((mod, args[0], out)))
             for b in model.blocks]
    try:
        out = model(idx, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, records


@pytest.mark.parametrize("mlp,approximate", [("gelu", "tanh"), ("gelu", "none"), ("swiglu", "none")])
def test_feed_forward_matches_its_formula_with_and_without_autograd(mlp, approximate):
    """Without autograd the activation runs in place on the up-projection's output; with it, out of place (its
    backward needs the input). Both equal the written-out formula, and gradients flow as through it."""
    config = tiny_config(mlp=mlp, gelu_approximate=approximate)
    ffn = FeedForward(config)
    torch.nn.init.normal_(ffn.up.weight, std=0.5)  # activations well away from 0, where the GELU forms differ
    x = torch.randn(3, 5, config.n_embd, requires_grad=True)

    def formula(x: torch.Tensor) -> torch.Tensor:
        up = F.linear(x, ffn.up.weight, ffn.up.bias)
        if mlp == "swiglu":
            h = F.linear(x, ffn.gate.weight, ffn.gate.bias)
            h = h * torch.sigmoid(h) * up
        else:
            h = F.gelu(up, approximate=approximate)
        return F.linear(h, ffn.down.weight, ffn.down.bias)

    expected = formula(x)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected.detach())
    out = ffn(x)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [x, ffn.up.weight])
    torch.testing.assert_close(grads, torch.autograd.grad(expected.square().sum(), [x, ffn.up.weight]))


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_attention_matches_naive_reference(pos_encoding, n_kv_head):
    config = tiny_config(pos_encoding=pos_encoding, n_kv_head=n_kv_head, block_size=12)
    model = random_model(config)
    idx = random_ids(config, 2, 12)
    with torch.no_grad():
        out, records = capture_attention_io(model, idx)  # SDPA path
        eager, eager_records = capture_attention_io(model, idx, return_attentions=True)
    assert len(records) == config.n_layer
    for (attn, x, (y, w)), (_, _, (_, w_eager)) in zip(records, eager_records, strict=True):
        assert w is None
        ref_y, ref_w = naive_attention(attn, x, config)
        torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w_eager.double(), ref_w, atol=1e-5, rtol=1e-5)
    # The explicit path computes the same logits and returns proper causal attention rows.
    torch.testing.assert_close(eager.logits, out.logits, atol=1e-5, rtol=1e-5)
    assert len(eager.attentions) == config.n_layer
    for w in eager.attentions:
        assert w.shape == (2, config.n_head, 12, 12)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, config.n_head, 12))
        assert torch.all(w >= 0)
        assert torch.all(w.triu(diagonal=1) == 0)
        assert w[..., -1, :].max() > 2 / 12  # not vacuous: the last row is far from uniform over its 12 keys


# ----------------------------------------------------------------------------------------------------------------------
# 2. Causality


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_future_tokens_never_change_past_logits(pos_encoding):
    config = tiny_config(pos_encoding=pos_encoding, n_kv_head=2, block_size=16)
    model = random_model(config, seed=1)
    idx = random_ids(config, 2, 16, seed=1)
    with torch.no_grad():
        base = model(idx).logits
        for t in (0, 5, 14):
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(16 - t - 1)) % config.vocab_size
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=0)
            # not vacuous: the changed positions' own logits do move
            assert (logits[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-2



@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_packed_examples_are_computed_as_each_alone(pos_encoding):
    """A row packing examples, with `segments` and `positions` restarting at each (as BatchSampler lays them out),
    gives every example the logits it has run alone from position 0, and the same through the explicit attention
    path (return_attentions), which also shows no weight across examples."""
    config = tiny_config(pos_encoding=pos_encoding, n_kv_head=2, block_size=16)
    model = random_model(config, seed=2)
    idx = random_ids(config, 2, 16, seed=2)
    bounds = [[0, 5, 6, 16], [0, 11, 16]]  # row 0: examples of 5, 1 and 10 tokens; row 1: 11 and 5
    segments = torch.tensor([[i for i, (a, b) in enumerate(zip(r, r[1:])) for _ in range(a, b)] for r in bounds])
    positions = torch.tensor([[t - a for a, b in zip(r, r[1:]) for t in range(a, b)] for r in bounds])
    with torch.no_grad():
        packed = model(idx, positions=positions, segments=segments, return_attentions=True)
        fast = model(idx, positions=positions, segments=segments).logits
        for row, r in enumerate(bounds):
            for a, b in zip(r, r[1:]):
                alone = model(idx[row : row + 1, a:b]).logits[0]
                torch.testing.assert_close(fast[row, a:b], alone, atol=1e-5, rtol=0)
                torch.testing.assert_close(packed.logits[row, a:b], alone, atol=1e-5, rtol=0)
    across = segments[:, None, :, None] != segments[:, None, None, :]  # (B, 1, T, T)
    assert all(float(w.masked_select(across.expand_as(w)).abs().max()) == 0.0 for w in packed.attentions)
    assert not torch.allclose(fast, model(idx).logits)  # not vacuous: unpacked, the later examples differ

# ----------------------------------------------------------------------------------------------------------------------
# 3. Grouped-query attention is multi-head attention with repeated K/V heads


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = tiny_config(n_head=4, n_kv_head=2, pos_encoding="rope")
    mha_cfg = tiny_config(n_head=4, n_kv_head=None, pos_encoding="rope")
    gqa = random_model(gqa_cfg, seed=3)
    mha = Transformer(mha_cfg).eval()
    nh, nkv, hd, group = 4, 2, gqa_cfg.head_dim, 2
    sd = {}
    for name, p in gqa.state_dict().items():
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            q, k, v = p.split([nh * hd, nkv * hd, nkv * hd], dim=0)
            # K/V head g serves query heads g*group .. g*group+group-1: duplicate each head's block of rows
            k = k.reshape(nkv, hd, *p.shape[1:]).repeat_interleave(group, dim=0).reshape(nh * hd, *p.shape[1:])
            v = v.reshape(nkv, hd, *p.shape[1:]).repeat_interleave(group, dim=0).reshape(nh * hd, *p.shape[1:])
            p = torch.cat([q, k, v], dim=0)
        sd[name] = p
    mha.load_state_dict(sd)
    idx = random_ids(gqa_cfg, 2, 20, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(mha(idx).logits, gqa(idx).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 4-5. Positional encodings


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_sinusoidal_encoding_matches_paper_formula(dim):
    T = 50
    pe = sinusoidal_encoding(torch.arange(T), dim)
    assert pe.shape == (T, dim)
    ref = torch.empty(T, dim, dtype=torch.float64)
    for p in range(T):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            ref[p, 2 * i] = math.sin(angle)
            ref[p, 2 * i + 1] = math.cos(angle)
    torch.testing.assert_close(pe.double(), ref, atol=2e-5, rtol=0)


def rotate(x: torch.Tensor, position: int, theta: float = 10000.0) -> torch.Tensor:
    cos, sin = rope_cos_sin(torch.tensor([position]), x.size(-1), theta)
    return apply_rope(x.view(1, 1, 1, -1), cos, sin).view(-1)


def test_rope_matches_definition_and_preserves_norm():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 16, generator=gen)
    cos, sin = rope_cos_sin(torch.arange(7), 16, 500.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.double(), reference_rope(x.double(), 500.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity


@pytest.mark.parametrize(("m", "n", "s"), [(0, 0, 5), (3, 1, 7), (1, 9, 20), (10, 4, 100)])
def test_rope_dot_product_depends_only_on_relative_position(m, n, s):
    gen = torch.Generator().manual_seed(m * 100 + n)
    q, k = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    before = rotate(q, m) @ rotate(k, n)
    after = rotate(q, m + s) @ rotate(k, n + s)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    if m != n:  # and it does depend on the offset itself
        assert abs(float(rotate(q, m) @ rotate(k, m)) - float(before)) > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# 6. Parameter counts


PARAM_GRID = list(itertools.product(["learned", "rope"], ["gelu", "swiglu"], ["layernorm", "rmsnorm"], [True, False],
                                    [True, False], [None, 2]))


@pytest.mark.parametrize(("pos", "mlp", "norm", "bias", "tied", "n_kv_head"), PARAM_GRID)
def test_count_params_matches_built_model(pos, mlp, norm, bias, tied, n_kv_head):
    config = ModelConfig(vocab_size=37, block_size=24, n_layer=3, n_head=4, n_embd=48, pos_encoding=pos, mlp=mlp,
                         norm=norm, bias=bias, tie_embeddings=tied, n_kv_head=n_kv_head)
    with torch.device("meta"):
        model = Transformer(config)
    counted = count_params(config)
    assert counted.total == model.num_params()
    assert counted.non_embedding == model.num_params(exclude_embeddings=True)


def gpt2_closed_form(d: int, n_layer: int, vocab: int = 50257, context: int = 1024) -> int:
    """GPT-2 with a tied head: token + position tables, per layer two LayerNorms (4d), c_attn (3d² + 3d), c_proj
    (d² + d), c_fc (4d² + 4d) and mlp.c_proj (4d² + d) = 12d² + 13d, and the final LayerNorm (2d)."""
    return vocab * d + context * d + n_layer * (12 * d * d + 13 * d) + 2 * d


# Published Hugging Face counts (tied head counted once). Check of the first by hand with the formula above:
# 50257·768 + 1024·768 + 12·(12·768² + 13·768) + 2·768 = 38,597,376 + 786,432 + 85,054,464 + 1,536 = 124,439,808.
GPT2_SIZES = {
    "gpt2": (768, 12, 124_439_808),
    "gpt2-medium": (1024, 24, 354_823_168),
    "gpt2-large": (1280, 36, 774_030_080),
    "gpt2-xl": (1600, 48, 1_557_611_200),
}


@pytest.mark.parametrize("name", list(GPT2_SIZES))
def test_gpt2_preset_sizes(name):
    d, n_layer, expected = GPT2_SIZES[name]
    assert gpt2_closed_form(d, n_layer) == expected
    config = ModelConfig.from_preset(name)
    assert (config.n_embd, config.n_layer) == (d, n_layer)
    assert count_params(config).total == expected
    with torch.device("meta"):
        assert Transformer(config).num_params() == expected


# ----------------------------------------------------------------------------------------------------------------------
# 7. Sliding-window attention (Mistral). Hugging Face parity of every family, GPT-2 included, is proven through the
# production converter in test_interop_hf.py.


def test_sliding_window_mask_and_cache():
    """Query p attends to keys p-w+1..p only, in the SDPA and eager paths, with and without a KV cache, also when the
    prompt is longer than the window."""
    w = 4
    config = tiny_config(pos_encoding="rope", n_kv_head=2, sliding_window=w)
    model = random_model(config, seed=3)
    idx = random_ids(config, 2, 20, seed=3)
    with torch.no_grad():
        full = model(idx, return_attentions=True)
        torch.testing.assert_close(model(idx).logits, full.logits, atol=1e-5, rtol=1e-5)
        q = torch.arange(20)[:, None]
        k = torch.arange(20)[None, :]
        outside = (k > q) | (k <= q - w)
        for weights in full.attentions:
            assert torch.all(weights[..., outside] == 0) and torch.all(weights[..., ~outside] > 0)
        for eager in (False, True):
            cache = KVCache(config, batch_size=2)
            pieces = [model(idx[:, a:b], cache=cache, return_attentions=eager).logits
                      for a, b in ((0, 11), (11, 12), (12, 20))]  # prompt longer than the window, then one token
            torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=1e-5, rtol=1e-5)
    prompt = random_ids(config, 1, 10, seed=4)[0].tolist()
    cached = list(generate(model, prompt, 12, temperature=0))
    assert cached == list(generate(model, prompt, 12, temperature=0, use_cache=False))


# ----------------------------------------------------------------------------------------------------------------------
# 8. Training works at all: memorize one batch


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = Transformer(config).init_weights(seed=0).train()
    data = random_ids(config, 4, 33, seed=0)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):  # reaches the target in about 35 steps
        loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break
    assert losses[0] == pytest.approx(math.log(50), abs=0.3)  # starts at chance
    assert losses[-1] < 0.05, f"did not overfit in {len(losses)} steps: {losses[::25]}"


# ----------------------------------------------------------------------------------------------------------------------
# 9. Initialization


def test_init_weights_statistics_and_determinism():
    config = ModelConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=True)
    model = Transformer(config)
    with torch.no_grad():  # make sure init overwrites whatever was there
        for p in model.parameters():
            p.fill_(3.0)
    model.init_weights(seed=123)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "ffn.down.weight")):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif p.ndim == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # norm gains
            assert torch.all(p == 1), name
    assert model.lm_head.weight is model.tok_emb.weight

    same = Transformer(config).init_weights(seed=123)
    other = Transformer(config).init_weights(seed=124)
    for (name, a), b, c in zip(model.state_dict().items(), same.state_dict().values(), other.state_dict().values(),
                               strict=True):
        assert torch.equal(a, b), name
        if a.ndim == 2:
            assert not torch.equal(a, c), name


def test_init_weights_rmsnorm_untied():
    config = tiny_config(norm="rmsnorm", bias=False, tie_embeddings=False, mlp="swiglu")
    model = Transformer(config).init_weights(seed=0)
    assert model.lm_head.weight is not model.tok_emb.weight
    assert not torch.equal(model.lm_head.weight, model.tok_emb.weight)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1), name


# ----------------------------------------------------------------------------------------------------------------------
# 10. Config validation


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_embd=30, n_head=4),  # n_embd not divisible by n_head
        dict(n_head=4, n_kv_head=3),  # n_head not divisible by n_kv_head
        dict(n_kv_head=0),
        dict(block_size=0),
        dict(block_size=-1),
        dict(n_layer=0),
    ],
)
def test_invalid_config_raises(overrides):
    with pytest.raises(ConfigError):
        tiny_config(**overrides)


def test_unknown_preset_raises():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("gpt5-nonexistent")


def test_unknown_field_raises():
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({"n_layers": 3})


def test_loss_is_cross_entropy():
    config = tiny_config()
    model = random_model(config, seed=2, std=0.1)
    idx = random_ids(config, 2, 10, seed=2)
    targets = random_ids(config, 2, 10, seed=3)
    targets[0, 3] = -1  # ignored position
    with torch.no_grad():
        out = model(idx, targets)
        logp = F.log_softmax(model(idx).logits.double(), dim=-1)
    picked = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(10) if targets[b, t] >= 0]
    assert out.loss.item() == pytest.approx(float(sum(picked) / len(picked)), rel=1e-5)
