"""The next-token loss computed together with the LM head, so that a training step holds one N × V buffer, not four.

`F.cross_entropy(head(x), targets)` over N positions and a vocabulary of V materializes the logits, their
log-softmax, the log-softmax's gradient and the logits' gradient: four N × V float tensors (GPT-2, one 1024-token
sequence: 206 MB each), each written once and, on a CPU, page-faulted afresh every step. linear_cross_entropy takes
the head's input and weight instead, and computes the loss and the gradients of x, weight and bias in the forward
pass, in one buffer overwritten in place: logits → log-probabilities → probabilities → their gradient (softmax minus
one-hot), which the same two matmuls as autograd's turn into the input gradients. The backward pass only scales them.
Liger-Kernel's fused linear cross-entropy does the same on GPUs with Triton; this is plain PyTorch. On this project's
CPU (BENCHMARKS.md, seventh reading; `benchmarks/fused_loss.py`) it is a memory saving first: GPT-2 124M's peak at
4 × 1024 tokens fell from 7.5-7.9 to 5.4-6.0 GB and its page faults per step halved; the step got 0-5 % faster.

Positions whose target is `ignore_index` count for nothing (as in F.cross_entropy's mean); the per-row weights that
mask them and divide by the count are applied to the small N × C side of the products, never to the N × V buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 1 << 28
"""Largest logits buffer held at once (256 MiB of fp32): more positions than fit are processed in chunks of rows, each
adding its products into the weight's gradient. GPT-2's 50,257-token vocabulary fits 1,335 positions a chunk."""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)  # an index for every row; ignored rows are weighted 0 below
        row_weight = valid / valid.sum()  # (N,): 1/count, or 0 — the mean over counted positions
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = grad_b = None
        loss = x.new_zeros((), dtype=torch.float32)
        rows = max(1, CHUNK_BYTES // (4 * weight.size(0)))
        for s in range(0, x.size(0), rows):
            xs, ts, ws = x[s:s + rows], safe[s:s + rows], row_weight[s:s + rows]
            buf = F.linear(xs, weight, bias).float()  # (n, V); under autocast the product runs in its dtype
            torch.log_softmax(buf, dim=-1, out=buf)  # in place: the kernel reads each row before writing it
            loss -= (buf.gather(1, ts[:, None]).squeeze(1) * ws).sum()
            if not (want_x or want_w or want_b):
                continue
            buf.exp_()  # softmax
            buf[torch.arange(len(ts), device=buf.device), ts] -= 1  # d loss_i / d logits_i = softmax_i - onehot_i
            g = buf.to(weight.dtype)  # the same tensor in fp32; the model's dtype otherwise, as autograd's would be
            # Row i's gradient is weighted by ws_i: weight the (n, C) factors, never the (n, V) buffer.
            if want_x:
                grad_x[s:s + rows] = (g @ weight) * ws[:, None].to(x.dtype)
            if want_w:  # (V, C); an out-of-place product, so that autocast still runs it in low precision
                part = g.t() @ (xs * ws[:, None]).to(weight.dtype)
                grad_w = part.to(weight.dtype) if grad_w is None else grad_w.add_(part)
            if want_b:
                part = (g.t() @ ws.to(g.dtype)).to(bias.dtype)  # (V,)
                grad_b = part if grad_b is None else grad_b.add_(part)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.used = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:  # the stored gradients are scaled in place below: a second pass would scale them twice
            raise RuntimeError("linear_cross_entropy's backward ran twice (retain_graph=True); compute the loss again "
                               "for each backward pass")
        ctx.used = True
        grad_x, grad_w, grad_b = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad.to(grad_x.dtype),
                None if grad_w is None else grad_w.mul_(grad.to(grad_w.dtype)),
                None if grad_b is None else grad_b.mul_(grad.to(grad_b.dtype)), None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(x, weight, bias)` against `targets`, in nats, without keeping the logits:
    x (..., C), weight (V, C), bias (V,) or None, targets (...) with `ignore_index` where nothing is predicted.
    Equal to F.cross_entropy(F.linear(x, weight, bias).float().flatten(0, -2), targets.flatten(),
    ignore_index=ignore_index), gradients included, computed as the module docstring says."""
    return _LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, bias, targets.reshape(-1), ignore_index)
