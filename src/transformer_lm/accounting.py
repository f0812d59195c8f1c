"""Closed-form size, compute and memory of a model, from its config alone (no tensors are built).

These are the formulas `tlm info` prints; the tests check them against the built model's real parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
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


def flops_per_token(c: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Matmul FLOPs per token (a multiply-add counts 2), PaLM-style: 2 per weight of every matmul (Q/K/V, output
    projection, feed-forward, LM head) plus the attention score and value matmuls at context `seq_len` (default
    block_size, without causal halving). Training is forward + backward = 3 × forward."""
    T = seq_len or c.block_size
    qkv_out = (c.n_head + 2 * c.kv_heads) * c.head_dim
    layer_weights = c.n_embd * qkv_out + c.n_embd * c.n_embd + (3 if c.mlp == "swiglu" else 2) * c.n_embd * c.ffn_dim
    matmul_weights = c.n_layer * layer_weights + c.vocab_size * c.n_embd
    attention = 2 * 2 * c.n_layer * T * c.n_head * c.head_dim
    forward = 2 * matmul_weights + attention
    return {"forward": float(forward), "train": float(3 * forward), "attention_forward": float(attention)}


def training_memory(c: ModelConfig, param_bytes: int = 4, grad_bytes: int = 4) -> dict[str, int]:
    """Bytes of weights, gradients and AdamW state (two fp32 moments) — activations depend on batch and are not
    included."""
    n = count_params(c).total
    return {"weights": n * param_bytes, "gradients": n * grad_bytes, "optimizer": n * 8,
            "total": n * (param_bytes + grad_bytes + 8)}
