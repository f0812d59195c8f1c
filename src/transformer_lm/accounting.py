"""Closed-form size, compute and memory of a model, from its config alone (no tensors are built).

These are the formulas `tlm info` prints; the tests check them against the built model's real parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import ModelConfig
from .errors import ConfigError


@dataclass(frozen=True)
class ParamCount:
    """A model's parameters by part, each tensor counted once (a tied head is the token table, counted there)."""

    embedding: int
    """Token (and learned position) tables."""
    per_layer: int
    layers: int
    final_norm: int
    head: int
    """The LM head's own matrix: 0 when tied to the token embedding."""

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.head

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything but the token and position tables."""
        return self.total - self.embedding


def count_params(c: ModelConfig) -> ParamCount:
    """The parameters `c` builds, in closed form (what `tlm info` prints; equal to the built model's count)."""
    if c.arch != "transformer":
        return _recurrent_params(c)
    d, f, hd = c.n_embd, c.ffn_dim, c.head_dim
    b = 1 if c.bias else 0
    norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
    qkv_out = (c.n_head + 2 * c.kv_heads) * hd
    attn = d * qkv_out + (qkv_out if c.has_qkv_bias else 0) + d * d + b * d
    ffn = (3 if c.mlp == "swiglu" else 2) * d * f + b * (f * (2 if c.mlp == "swiglu" else 1) + d)
    per_layer = 2 * norm + attn + ffn
    embedding = c.vocab_size * d + (c.block_size * d if c.pos_encoding == "learned" else 0)
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return ParamCount(embedding, per_layer, c.n_layer * per_layer, norm, head)


def _recurrent_params(c: ModelConfig) -> ParamCount:
    """An LSTM layer has 4 gates (input, forget, cell, output), an RNN layer 1; each gate holds an input and a
    recurrent d×d matrix and, with biases, torch's two bias vectors (b_ih and b_hh). No positions, no final norm."""
    d = c.n_embd
    per_layer = _gates(c) * (2 * d * d + (2 * d if c.bias else 0))
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return ParamCount(c.vocab_size * d, per_layer, c.n_layer * per_layer, 0, head)


def _gates(c: ModelConfig) -> int:
    return 4 if c.arch == "lstm" else 1


def flops_per_token(c: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Matmul FLOPs per token (a multiply-add counts 2), PaLM-style: 2 per weight of every matmul (Q/K/V, output
    projection, feed-forward, LM head) plus the attention score and value matmuls at context `seq_len` (default
    block_size, without causal halving; a sliding window caps it: Mistral-7B at 32k keys was overstated 1.9×).
    Training is forward + backward = 3 × forward. A recurrent model's matmuls are its gates' input and recurrent
    matrices and the LM head, whatever the context: it has no attention term."""
    T = seq_len or c.block_size
    if c.arch != "transformer":
        forward = 2 * (c.n_layer * _gates(c) * 2 * c.n_embd * c.n_embd + c.vocab_size * c.n_embd)
        return {"forward": float(forward), "train": float(3 * forward), "attention_forward": 0.0}
    qkv_out = (c.n_head + 2 * c.kv_heads) * c.head_dim
    layer_weights = c.n_embd * qkv_out + c.n_embd * c.n_embd + (3 if c.mlp == "swiglu" else 2) * c.n_embd * c.ffn_dim
    matmul_weights = c.n_layer * layer_weights + c.vocab_size * c.n_embd
    keys = min(T, c.sliding_window) if c.sliding_window else T  # the keys each query attends to
    attention = 2 * 2 * c.n_layer * keys * c.n_head * c.head_dim
    forward = 2 * matmul_weights + attention
    return {"forward": float(forward), "train": float(3 * forward), "attention_forward": float(attention)}


def prefill_flops_per_token(config: ModelConfig, prompt_len: int) -> float:
    """Forward FLOPs per prompt token of a Transformer's prefill, whose only output is the last position's logits:
    the LM head runs there only (counting it at every position overstated GPT-2's prefill MFU by a third), and so do
    the last block's attention, output projection and feed-forward, its other positions being needed only for the
    keys and values it caches (model.Transformer.forward); its Q/K/V projection runs at every position."""
    c, T = config, prompt_len
    full = flops_per_token(c, T)["forward"]  # every layer and the head at every position
    head = 2 * c.vocab_size * c.n_embd
    qkv = 2 * c.n_embd * (c.n_head + 2 * c.kv_heads) * c.head_dim
    layer = (full - head) / c.n_layer  # one block at one position, attending over T keys
    return full - (head + layer - qkv) * (T - 1) / T


def training_memory(c: ModelConfig, param_bytes: int = 4, grad_bytes: int = 4) -> dict[str, int]:
    """Bytes of weights, gradients and AdamW state (two fp32 moments) — activations depend on batch and are not
    included."""
    n = count_params(c).total
    return {"weights": n * param_bytes, "gradients": n * grad_bytes, "optimizer": n * 8,
            "total": n * (param_bytes + grad_bytes + 8)}


def match_params(c: ModelConfig, arch: Literal["lstm", "rnn"], n_layer: int | None = None) -> ModelConfig:
    """`c` turned into a recurrent `arch` model of `n_layer` layers (default c's) whose width n_embd gives the
    non-embedding parameter count closest to c's: the fair size for comparing architectures (Kaplan et al.'s N; with
    a small vocabulary the embedding is a small share anyway)."""
    if arch not in ("lstm", "rnn"):
        raise ConfigError(f"match_params makes lstm or rnn models, got {arch!r}")
    target = count_params(c).non_embedding
    base = {**c.to_dict(), "arch": arch, "n_layer": n_layer or c.n_layer}
    best = min(range(1, 16 * c.n_embd + 1),
               key=lambda d: abs(count_params(ModelConfig.from_dict({**base, "n_embd": d})).non_embedding - target))
    return ModelConfig.from_dict({**base, "n_embd": best})
