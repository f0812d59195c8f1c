"""A decoder-only Transformer language model, readable top to bottom.

positional encodings → KV cache → attention → feed-forward → block → Transformer.
Every architectural choice is a ModelConfig field; nothing here looks at names or paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .loss import linear_cross_entropy

if TYPE_CHECKING:
    from .recurrent import RecurrentLM

# ----------------------------------------------------------------------------------------------------------------------
# Positional encodings. Both are computed on the fly from positions: they hold no state, so a model built on the
# meta device needs no buffer re-initialization, and any position up to block_size works with a KV cache offset.


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)). -> (T, dim)"""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # interleave: sin at 2i, cos at 2i+1


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/d) -> (head_dim/2,), computed as Hugging Face does (1 / theta^(2i/d) in fp32,
    so imported models match it bit for bit), with Llama 3's scaling when configured: wavelengths longer than
    original/low_freq_factor are slowed by `factor`, shorter than original/high_freq_factor kept, and the band
    between interpolated smoothly."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd)
    if config.rope_scaling == "llama3":
        factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        original = config.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables in the "rotate half" layout (dimension i pairs with i + head_dim/2). -> two (T, head_dim)
    `inv_freq` overrides the plain theta^(-2i/d) frequencies (see rope_inv_freq)."""
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                   / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its position's angle; x is (B, nh, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


# ----------------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache(nn.Module):
    """Preallocated keys and values of every layer, so incremental decoding attends to the past without recomputing it.

    `pos` is the number of positions already written; the model writes new keys at [pos, pos + T) and advances it.
    """

    static = False
    """False: `pos` is an int and update() returns the filled prefix. A static cache (decode.StaticKVCache) keeps `pos`
    in a device tensor and returns all max_len slots, always masked: fixed shapes and no host sync, for compiling."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.kv_heads, self.max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) for `layer` at the current position; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------------------------------------------
# Layers


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def attention_mask(T: int, S: int, start: int, window: int | None, device: torch.device,
                   key_mask: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """(T, S) bool, True where query t (at absolute position start+t) may attend to key s: s <= start+t, and with a
    sliding window also s > start+t-window (the last `window` keys, itself included). With `key_mask` (B, ≥S), False
    at padding, -> (B, 1, T, S): padding is hidden from every query but itself (so no row is empty, no NaN). With
    `segments` (B, T = S, no cache), -> (B, 1, T, T): a query sees only keys of its own segment (packed examples)."""
    q = start + torch.arange(T, device=device)[:, None]  # start: an int, or a 0-d tensor (static cache)
    s = torch.arange(S, device=device)[None, :]
    allowed = s <= q
    if window is not None:
        allowed &= s > q - window
    if key_mask is not None:
        allowed = allowed & (key_mask[:, None, None, :S] | (s == q))
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    return allowed


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads (n_kv_head ≤ n_head)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.n_kv, self.hd = config.n_head, config.kv_heads, config.head_dim
        # Q, K and V come from one fused projection: one matmul instead of three.
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=config.has_qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
                return_weights: bool, key_mask: torch.Tensor | None = None, last_only: bool = False,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> the attention output (B, T, C), or with `last_only` that of the last query only (B, 1, C): keys and
        values still come from, and go into the cache at, every position."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nkv, start+T, hd)
        if self.n_kv != self.n_head:  # grouped-query: each K/V head serves n_head/n_kv query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        S = k.size(2)
        # Query t (at absolute position start+t) may see keys 0..start+t, and with a sliding window w only the last w
        # of them (start+t-w < key). Without a binding window: no past is the plain causal mask, and a single new
        # token sees everything, so no mask at all.
        window = self.config.sliding_window
        windowed = window is not None and S > window
        mask = None
        if (cache is not None and cache.static) or windowed or (start > 0 and T > 1) or key_mask is not None or \
                segments is not None:
            mask = attention_mask(T, S, start, window, x.device, key_mask, segments)
        causal = mask is None and T > 1
        if last_only:  # the last query sees every key written so far: its row of the mask, or no mask at all
            q, T, causal = q[:, :, -1:], 1, False
            mask = None if mask is None else mask[..., -1:, :]
        dropout = self.config.dropout if self.training else 0.0
        weights = None
        if return_weights:  # explicit path: softmax(QKᵀ/√d)·V, keeping the weights for inspection
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)  # (B, nh, T, S)
            allowed = attention_mask(T, S, start, window, x.device, key_mask, segments)
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(weights) @ v  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.proj(y)), weights


class FeedForward(nn.Module):
    """Position-wise network: GELU MLP (up → gelu → down) or SwiGLU (silu(gate) * up → down). Without autograd the
    activation is applied in place, so a forward hook on `up` (or `gate`) that keeps its output must clone it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.approximate = config.gelu_approximate
        hidden = config.ffn_dim
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias) if self.swiglu else None
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        # Without autograd (inference) the activation overwrites its input instead of allocating another (tokens,
        # ffn_dim) buffer, which a CPU page-faults in whenever the allocator has returned the last one to the system:
        # a 1024-token GPT-2 prefill up to 1.1x faster (BENCHMARKS.md). Training keeps the input for the backward.
        inplace = not h.requires_grad
        if self.gate is not None:
            g = F.silu(self.gate(x), inplace=inplace)
            h = h.mul_(g) if inplace else h * g
        elif inplace:
            h = torch.ops.aten.gelu_(h, approximate=self.approximate)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
                return_weights: bool, key_mask: torch.Tensor | None = None, last_only: bool = False,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (B, T, C), or with `last_only` the last position's output only (B, 1, C)."""
        a, weights = self.attn(self.norm1(x), rope, cache, return_weights, key_mask, last_only, segments)
        x = (x[:, -1:] if last_only else x) + a
        return x + self.ffn(self.norm2(x)), weights


# ----------------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    """(B, T, vocab) — or (B, 1, vocab) when only the last position was asked for. None when the loss was computed
    together with the head (targets given: see head_loss)."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy in nats, when targets were given."""
    attentions: list[torch.Tensor] | None = None
    """Per layer, the (B, n_head, T, S) attention weights, when asked for."""


def head_loss(head: nn.Module, x: torch.Tensor, targets: torch.Tensor | None,
              attentions: list[torch.Tensor] | None = None) -> LMOutput:
    """The LM head on the final hidden states x (B, T, C), and the mean next-token cross-entropy against targets (B, T)
    (-1: no target). With targets, a plain linear head gets the loss without the logits: linear_cross_entropy never
    holds the (B·T, vocab) logits or their gradients, the largest tensors of a small model's step, and of an
    evaluation at a long context (Qwen2's 32k positions × 151,936 ids are 20 GB of fp32 logits a sequence). A
    training step in float16 keeps the plain loss: the fused one computes the head's gradients in the forward pass,
    before a GradScaler's scale could keep their small values from underflowing in half precision."""
    dev = x.device.type
    half = x.dtype == torch.float16 or (torch.is_autocast_enabled(dev)
                                        and torch.get_autocast_dtype(dev) == torch.float16)
    if targets is not None and type(head) is nn.Linear and not (half and torch.is_grad_enabled()):
        return LMOutput(None, linear_cross_entropy(x, head.weight, head.bias, targets), attentions)
    logits = head(x)  # (B, T, vocab)
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
    return LMOutput(logits, loss, attentions)


class Transformer(nn.Module):
    """Token embedding + positions → n_layer blocks → final norm → LM head predicting the next token.

    Construction does not initialize: call `init_weights()` for a fresh model, or load a state dict. That keeps
    construction cheap on the meta device for models that are loaded, not trained from scratch.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> Transformer:
        """GPT-2 initialization: N(0, 0.02) for matrices and embeddings, zero biases, unit norm gains, and the
        residual output projections scaled by 1/√(2·n_layer) so the residual stream's variance does not grow
        with depth."""
        gen = torch.Generator(device=self.tok_emb.weight.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("attn.proj", "ffn.down")) else 0.02
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        return self

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied matrix counted once. `exclude_embeddings` drops the token and position tables
        (Kaplan et al.'s non-embedding N; an untied LM head stays)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n

    def make_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for incremental decoding of `batch_size` rows, up to `max_len` positions (default
        block_size), on the weights' device and in their dtype unless told otherwise."""
        w = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device or w.device, dtype or w.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                last_only: bool = False, return_attentions: bool = False, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> LMOutput:
        """idx (B, T) token ids. `cache` continues from cache.pos; `last_only` computes logits of the last position
        only (all that sampling needs: the head is the largest matmul for big vocabularies), and the last block's
        output there only (the cache still gets every position's keys and values). For left-padded
        batches: `positions` (B, T) per-row positions (default: cache.pos + 0..T-1 for all rows) and `key_mask`
        (B, cache.pos + T or more) bool, False at padding slots. For examples packed into rows (training on them,
        windows.BatchSampler's layout): `segments` (B, T), equal within an example, hides each from the others, and
        `positions` restart at each, so that every example is computed as it would be alone."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        limit = min(cache.max_len, self.config.block_size) if cache is not None else self.config.block_size
        if not (cache is not None and cache.static) and start + T > limit:  # a static cache's pos is on the device
            raise ValueError(f"{start + T} positions exceed the context window of {limit}; crop the input")
        if positions is None:
            positions = start + torch.arange(T, device=idx.device)  # (T,), or (B, T) when given
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif self.config.pos_encoding == "sinusoidal":
            pe = sinusoidal_encoding(positions.flatten(), self.config.n_embd)
            x = x + pe.view(*positions.shape, -1).to(x.dtype)
        rope = None
        if self.config.pos_encoding == "rope":
            inv_freq = rope_inv_freq(self.config, idx.device)
            cos, sin = rope_cos_sin(positions.flatten(), self.config.head_dim, self.config.rope_theta, inv_freq)
            shape = (positions.size(0), 1, T, -1) if positions.dim() == 2 else (T, -1)  # (B, 1, T, hd): all heads
            rope = cos.view(shape), sin.view(shape)
        x = self.dropout(x)
        attentions = [] if return_attentions else None
        for i, block in enumerate(self.blocks):
            # When only the last position's logits are wanted, the last block needs its other positions only for the
            # keys and values it caches: attention, projection and feed-forward run on the last row alone (as
            # llama.cpp does; a 1024-token GPT-2 prefill does ~6 % less work).
            last = last_only and i == len(self.blocks) - 1 and not return_attentions
            x, w = block(x, rope, cache, return_attentions, key_mask, last, segments)
            if attentions is not None:
                attentions.append(w)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        return head_loss(self.lm_head, x, targets, attentions)


def build_model(config: ModelConfig) -> Transformer | RecurrentLM:
    """The model `config.arch` names, uninitialized (call `init_weights()` or load a state dict): the one place
    that chooses between the Transformer and its recurrent baselines."""
    if config.arch == "transformer":
        return Transformer(config)
    from .recurrent import RecurrentLM  # recurrent.py builds on this module (LMOutput)

    return RecurrentLM(config)
