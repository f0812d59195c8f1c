"""The fused LM head and loss (loss.py) against the plain path it replaces: F.cross_entropy on F.linear's logits,
differentiated by autograd. Loss and every gradient must agree, with ignored targets, chunked rows, a scaled backward,
autocast, and inside the models' training step (tied and untied heads, eager and compiled, the LSTM baseline)."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import transformer_lm.loss as loss_module
from conftest import random_model
from transformer_lm.config import ModelConfig
from transformer_lm.evaluate import evaluate_tokens
from transformer_lm.loss import linear_cross_entropy
from transformer_lm.model import Transformer
from transformer_lm.recurrent import RecurrentLM


def leaves(n: int = 37, c: int = 16, v: int = 101, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen).requires_grad_()
    w = torch.randn(v, c, generator=gen).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    t[::5] = -1  # ignored positions: they count neither in the mean nor in any gradient
    return x, w, b, t


def loss_and_grads(fn, *params: torch.Tensor, scale: float = 0.3):
    """fn()'s value and the gradients of `scale * fn()` (a scaled backward, as gradient accumulation makes it)."""
    for p in params:
        p.grad = None
    loss = fn()
    (loss * scale).backward()
    return [loss.detach(), *(p.grad.clone() for p in params)]


def reference(x, w, b, t):
    return F.cross_entropy(F.linear(x, w, b).float(), t, ignore_index=-1)


@pytest.mark.parametrize("chunk_rows", [None, 8, 1])  # whole, chunks of 8 positions (the last one short), one by one
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(monkeypatch, chunk_rows):
    x, w, b, t = leaves()
    if chunk_rows:
        monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * w.size(0) * chunk_rows)
    want = loss_and_grads(lambda: reference(x, w, b, t), x, w, b)
    got = loss_and_grads(lambda: linear_cross_entropy(x, w, b, t), x, w, b)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert torch.all(got[1][t == -1] == 0)  # an ignored position's input gets no gradient


def test_batched_input_without_bias_and_only_some_gradients():
    x, w, _, t = leaves(n=24)
    x3, t2 = x.detach().view(4, 6, -1).requires_grad_(), t.view(4, 6)  # (B, T, C) and (B, T), as the model passes them
    want = loss_and_grads(lambda: reference(x3.flatten(0, 1), w, None, t), x3, w)
    got = loss_and_grads(lambda: linear_cross_entropy(x3, w, None, t2), x3, w)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    frozen = w.detach()  # a frozen head: only the input's gradient is asked for (and computed)
    got = loss_and_grads(lambda: linear_cross_entropy(x3, frozen, None, t2), x3)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_without_gradients_only_the_loss():
    x, w, b, t = leaves()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, b, t), reference(x, w, b, t))


def test_under_bf16_autocast_matches_the_plain_path_under_autocast():
    x, w, b, t = leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(lambda: reference(x, w, b, t), x, w, b)
        got = loss_and_grads(lambda: linear_cross_entropy(x, w, b, t), x, w, b)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=2e-3, rtol=2e-2)  # the same bf16 products, summed in another order


def test_a_second_backward_is_refused_not_double_counted():
    x, w, b, t = leaves()
    loss = linear_cross_entropy(x, w, b, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def training_grads(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, fused: bool):
    """Loss and parameter gradients of one training forward: the model's own (fused) loss, or the plain path on the
    logits it returns without targets."""
    model.zero_grad(set_to_none=True)
    if fused:
        out = model(idx, targets)
        assert out.logits is None  # the logits were never materialized
        loss = out.loss
    else:
        logits = model(idx).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_training_step_equals_the_plain_loss(family):
    base = dict(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32)
    if family == "llama":  # untied head, no biases
        base.update(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2)
    model = random_model(ModelConfig(**base), std=0.1).train()
    idx = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    want_loss, want = training_grads(model, idx, targets, fused=False)
    got_loss, got = training_grads(model, idx, targets, fused=True)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # evaluation with targets: the same loss, without the logits either
        out = model(idx, targets)
        with torch.autocast("cpu", dtype=torch.float16):  # no gradients to underflow: float16 is fused too
            assert model(idx, targets).logits is None
    assert out.logits is None
    torch.testing.assert_close(out.loss, want_loss)
    with torch.autocast("cpu", dtype=torch.float16):  # float16 training keeps the plain path, for the GradScaler
        assert model(idx, targets).logits is not None


def test_evaluation_never_holds_the_logits_of_a_window():
    """tlm eval took the full (B, T, vocab) logits and their fp32 copy: an imported long-context model (Qwen2, 32k
    positions × 151,936 ids) needed 20 GB a sequence. Its loss is the naive cross-entropy's, with the largest
    buffer held one chunk of the fused loss (the test's chunk: 4 rows of logits)."""
    config = ModelConfig(vocab_size=997, block_size=64, n_layer=1, n_head=2, n_embd=16)
    model = random_model(config, std=0.1).eval()
    tokens = np.random.default_rng(0).integers(0, 997, size=2 * 64 + 1)
    with torch.no_grad():
        ids = torch.from_numpy(tokens)
        x, y = ids[:-1].view(2, 64), ids[1:].view(2, 64)
        want = float(F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()))
    real_linear, heads = F.linear, []

    def linear(x, weight, bias=None):  # every F.linear call; the head's are those with 997 outputs
        out = real_linear(x, weight, bias)
        if out.size(-1) == 997:
            heads.append(out[..., 0].numel())  # rows of logits held by this call
        return out

    with mock.patch.object(loss_module, "CHUNK_BYTES", 4 * 4 * 997), mock.patch.object(F, "linear", linear):
        got = evaluate_tokens(model, tokens, bytes_per_token=1.0, batch_size=2)
    assert heads and max(heads) == 4  # one chunk of rows at a time, never the window's 128
    assert got.tokens == 128 and got.loss == pytest.approx(want, rel=1e-5)


def test_recurrent_baseline_uses_the_same_loss():
    model = RecurrentLM(ModelConfig(arch="lstm", vocab_size=61, block_size=16, n_layer=1, n_embd=32)).init_weights(0)
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    want_loss, want = training_grads(model, idx, idx, fused=False)
    got_loss, got = training_grads(model, idx, idx, fused=True)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    config = ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32)
    model = Transformer(config).init_weights(0).train()
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    want_loss, want = training_grads(model, idx, idx, fused=True)
    got_loss, got = training_grads(torch.compile(model), idx, idx, fused=True)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
