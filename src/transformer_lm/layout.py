"""Decode-time weight layout: linear layers that store Wᵀ contiguous, [in, out], and compute x @ Wᵀ directly.

    model = decode_layout(load_run(path).model)   # in place; a no-op where it does not pay

nn.Linear keeps W as [out, in] and multiplies by its transpose (an "NT" GEMM). On this project's CPU (MKL, fp32,
one thread) that path is slower than the plain "NN" product with Wᵀ stored [in, out] at a few rows: 768→2304 at 8
rows 0.9 ms vs 0.4 ms with the weight in cache, and the tied GPT-2 head at 1 row ~1.2× faster. Whole-model GPT-2
decoding on one thread: batch 8 1.2-1.3× faster, batch 1 1.1×, prefill of 1024 tokens unchanged (measured on a
loaded machine; with two threads there, no consistent difference). With two threads on a later host (session 18) the
NN path at 2-4 rows was the slow one, 2.3× at 2 rows (768→2304: 0.30 vs 0.13 ms): a GPT-2 step of 2 rows took 53 ms
instead of 22, of 4 rows 56 instead of 40, of 8 rows 66 instead of 56, against 18.6 instead of 19.1 at 1 row; so
`tlm serve`, which batches, keeps nn.Linear. GPT-2's Conv1D stores its weights this way. In
bf16 the NT path is the faster one (oneDNN), and on GPUs cuBLAS takes either layout at full speed: there the model
is left alone.

Like quantization, this is a transformation of a finished model for inference, applied after loading and never
saved: training and checkpoints keep nn.Linear. A tied LM head keeps its tie: the token embedding then looks its
rows up as columns of the same [n_embd, vocab] matrix (one strided gather per token), so no second copy is held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransposedLinear(nn.Module):
    """y = x @ weight_t + b, weight_t = Wᵀ of an nn.Linear stored contiguous as [in_features, out_features]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """W as nn.Linear holds it, [out, in] (a view, not a copy): what quantize() and readers of .weight expect."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)  # (rows, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TransposedEmbedding(nn.Module):
    """The token embedding of a model whose LM head is tied to it and became a TransposedLinear: the lookup reads
    row i of W as column i of the head's [n_embd, vocab] weight_t (the same Parameter: the tie is kept)."""

    def __init__(self, weight_t: nn.Parameter) -> None:
        super().__init__()
        self.weight_t = weight_t

    @property
    def weight(self) -> torch.Tensor:
        """[vocab, n_embd], a view of weight_t."""
        return self.weight_t.t()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_t.t())


def pays_off(model: nn.Module) -> bool:
    """Whether the [in, out] layout is faster for `model`: float32 weights on a CPU (measured; see the module doc)."""
    w = next(model.parameters())
    return w.device.type == "cpu" and w.dtype == torch.float32


def transpose_linears(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of `model` for a TransposedLinear holding the same values (and a tied token embedding
    for a TransposedEmbedding sharing them), in place, whatever the device; returns the model, in eval mode."""
    head = getattr(model, "lm_head", None)
    emb = getattr(model, "tok_emb", None)
    tied = isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight
    for name, linear in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TransposedLinear(linear))
    if tied:
        model.tok_emb = TransposedEmbedding(model.lm_head.weight_t)
    return model.eval()


def decode_layout(model: nn.Module) -> nn.Module:
    """transpose_linears(model) where that pays off (pays_off), else `model` unchanged; for inference only."""
    return transpose_linears(model) if pays_off(model) else model.eval()
