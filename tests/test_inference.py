"""The generation engine: weight-only quantization (error bounds), speculative decoding (greedy identity and an
unchanged sampling distribution) and batched generation (same ids as one by one). CPU, float32, no timing."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import conftest
from transformer_lm.config import ModelConfig
from transformer_lm.errors import ConfigError
from transformer_lm.generate import generate, generate_batch
from transformer_lm.model import Transformer
from transformer_lm.perf import weight_bytes
from transformer_lm.quantize import Int4Linear, Int8Embedding, Int8Linear, W8A8Linear, parse_quantize, quantize
from transformer_lm.speculative import speculative_generate


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=61, block_size=64, n_layer=2, n_head=4, n_embd=32), **overrides})


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.1) -> Transformer:
    """Smaller than the shared default: random weights still larger than GPT-2's init (near-flat logits make argmax
    ties likely)."""
    return conftest.random_model(config, seed, std)


VARIANTS = {"gpt2": {}, "llama": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", n_kv_head=2, bias=True,
                                      tie_embeddings=False),
            "sinusoidal": dict(pos_encoding="sinusoidal"),
            "mistral": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", n_kv_head=2, bias=False,
                            sliding_window=4)}


# ----------------------------------------------------------------------------------------------------------------------
# 1. Quantization


@pytest.mark.parametrize("shape", [(48, 64), (7, 32), (1, 128)])
def test_int8_dequantization_error_is_at_most_half_a_step(shape):
    linear = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 1, shape[0])[:, None])  # rows of very different scales
    q = Int8Linear(linear)
    err = (q.dequantize() - linear.weight).abs()
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    assert (err <= q.scales[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("group_size", [2, 16, 32])
def test_int4_dequantization_error_is_at_most_half_a_group_step(group_size):
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight[3].zero_()  # a constant group: zero range, must not divide by zero
        linear.weight[5] += 4.0  # groups far from 0: the asymmetric zero point must follow them
    q = Int4Linear(linear, group_size)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (24, 32)  # two 4-bit values per byte
    step = q.scales.repeat_interleave(group_size, dim=1)  # (out, in): each element's group step
    err = (q.dequantize() - linear.weight).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_output_within_the_worst_case_bound(bits):
    """|Δy_j| = |Σ_i Δw_ji x_i| ≤ Σ_i |Δw_ji| |x_i| ≤ Σ_groups (step/2)·‖x_group‖₁: a bound that holds for every
    input, not on average."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    q = Int8Linear(linear) if bits == 8 else Int4Linear(linear, 16)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        dy = (q(x) - linear(x)).abs()
        if bits == 8:
            bound = q.scales / 2 * x.abs().sum(-1, keepdim=True)  # (3, 5, out)
        else:
            l1 = x.abs().unflatten(-1, (4, 16)).sum(-1)  # (3, 5, groups)
            bound = l1 @ (q.scales / 2).T  # (3, 5, out)
    assert (dy <= bound * (1 + 1e-4) + 1e-5).all()


def test_int8_forward_matches_the_dequantized_weight_and_the_int8_kernel():
    """The forward scales outputs, not weights; both must equal x·dequantize(W)ᵀ, as must PyTorch's int8 kernel."""
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(64, 40, bias=True))
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        ref = x @ q.dequantize().T + q.bias
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
        if hasattr(torch, "_weight_int8pack_mm"):
            kernel = torch._weight_int8pack_mm(x.reshape(-1, 64), q.weight, q.scales).reshape(2, 7, 40) + q.bias
            torch.testing.assert_close(kernel, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("kind", ["int8", "int4:16", "int4:48"])
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_kernels_equal_the_dequantize_then_matmul_reference(rows, compiling, kind, bias, monkeypatch):
    """Every path of Int8Linear.forward and Int4Linear.forward — the fused multiply-reduce that compiled one-row
    steps take (run eagerly here by pretending to compile; int4's applies zero points and scales per group, after
    the sum), the eager block-by-block widening for few rows (300 outputs: 3 blocks of WIDEN_BLOCK) and the plain
    widening — equals x·dequantize(W)ᵀ + b."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 300, bias=bias)
    with torch.no_grad():
        linear.weight[:, :16] += 1.0  # a group far from 0: the zero point's term must be right
    q = Int8Linear(linear) if kind == "int8" else Int4Linear(linear, int(kind.split(":")[1]))
    x = torch.randn(rows, 1, 48)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with torch.no_grad():
        reference = x @ q.dequantize().T + (q.bias if bias else 0)
        torch.testing.assert_close(q(x), reference, rtol=1e-5, atol=1e-5)


def test_int8_embedding_looks_up_the_dequantized_head_rows():
    head = Int8Linear(nn.Linear(16, 50, bias=False))
    emb = Int8Embedding(head, torch.float32)
    idx = torch.tensor([[0, 49, 7], [7, 7, 3]])
    torch.testing.assert_close(emb(idx), head.dequantize()[idx], rtol=0, atol=0)
    assert emb.weight is head.weight and emb.scales is head.scales  # one table


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_decode_equals_eager(bits):
    """The compiled decode step takes the fused int8 / int4 path (~30 s to compile on a 2-core CPU, hence slow)."""
    model = quantize(random_model(tiny_config()), bits, group_size=16)
    prompt = [1, 2, 3, 4]
    assert list(generate(model, prompt, 16, 0.0, compile=True)) == list(generate(model, prompt, 16, 0.0))


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_w8a8_error_is_within_the_activation_rounding_bound(rows):
    """w8a8 multiplies the int8 weights Ŵ by the input rounded onto 256 levels spanning [min(x, 0), max(x, 0)]
    (fbgemm's dynamic quantization: one step s_x = span/255 per call, 127 levels' worth with 7-bit inputs). Each
    input is then off by at most s_x/2, so output j is off from x·Ŵⱼᵀ + b by at most s_x/2 · Σᵢ|Ŵⱼᵢ|."""
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 40)
    q = W8A8Linear(linear)
    x = torch.randn(rows, 96, generator=gen) * 3
    w = q.dequantize()
    ref = x @ w.T + q.bias
    span = x.max().clamp(min=0) - x.min().clamp(max=0)
    step = span / (127 if q.reduce_range else 255)
    bound = step / 2 * w.abs().sum(dim=1) + 1e-4  # (40,), plus float32 slack
    err = (q(x) - ref).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0  # the activations really are rounded (not a float matmul in disguise)
    assert q(x.view(rows, 1, 96)).shape == (rows, 1, 40)


def test_w8a8_model_is_close_to_int8_and_survives_a_deep_copy():
    """A w8a8 model keeps int8's weights (same levels and scales, head and tied embedding included) and adds only the
    activations' rounding; a deep copy is a working model of its own, also after the original is gone."""
    model = random_model(tiny_config())
    x = torch.randint(0, 61, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
        q8 = quantize(copy.deepcopy(model), 8)
        w8 = quantize(copy.deepcopy(model), 8, dynamic=True)
        assert type(w8.lm_head) is W8A8Linear and type(w8.tok_emb) is Int8Embedding
        torch.testing.assert_close(w8.lm_head.weight, q8.lm_head.weight, rtol=0, atol=0)
        # the weights are held once: the kernel's packed levels, the int8 buffer only for the tied head's lookup
        layers = [(a, b) for a, b in zip(w8.modules(), q8.modules()) if isinstance(a, W8A8Linear)]
        assert len(layers) > 1 and all(a.weight is None for a, _ in layers[:-1])
        for a, b in layers:
            torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=0)
        assert weight_bytes(w8) == weight_bytes(q8)  # what a decode step reads, wherever the levels are held
        assert sum(b.numel() for b in w8.buffers()) < sum(b.numel() for b in q8.buffers()) / 2
        logits = w8(x).logits
        assert (logits - ref).norm() / ref.norm() < 0.08
        assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        twin = copy.deepcopy(w8)
        assert twin.lm_head.key != w8.lm_head.key
        del w8
        torch.testing.assert_close(twin(x).logits, logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="w8a8"):
        quantize(copy.deepcopy(model), 4, dynamic=True)
    assert parse_quantize("w8a8") == {"bits": 8, "group_size": 128, "dynamic": True}


@pytest.mark.slow
def test_compiled_w8a8_decode_equals_eager():
    """Compiled, the fbgemm call is an opaque custom op inside one decode graph."""
    model = quantize(random_model(tiny_config()), 8, dynamic=True)
    prompt = [1, 2, 3, 4]
    assert list(generate(model, prompt, 16, 0.0, compile=True)) == list(generate(model, prompt, 16, 0.0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_model_logits_close_and_greedy_mostly_equal(variant):
    """Per layer the relative output error of W x is about step/(√12·rms(w)) (independent rounding errors, uniform
    in ±step/2): int8 step = max|w_row|/127, and for Gaussian rows max ≤ ~4·rms, so ≤ 1%; int4 groups of 16 have
    step = range/15 ≈ 3.5·rms/15, so ≈ 7%. Errors of the 8 quantized layers in series (int8: also the head and
    the tied embedding) add up and the network amplifies them somewhat: measured 0.9-1.7% (int8) and 10-20% (int4)
    on these models, so the bounds below are ~3× (int8) and 1.5× (int4) the theory-based estimate of √8 × the
    per-layer error."""
    model = random_model(tiny_config(**VARIANTS[variant]))
    x = torch.randint(0, 61, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
        for bits, bound, agree_min in ((8, 0.05, 0.95), (4, 0.3, 0.7)):
            q = quantize(copy.deepcopy(model), bits, group_size=16)
            assert not any(type(m) is nn.Linear for n, m in q.named_modules() if n != "lm_head")
            # the head is quantized too, to int8 with int4 blocks as well (and a tied embedding with it)
            assert type(q.lm_head) is Int8Linear
            logits = q(x).logits
            assert (logits - ref).norm() / ref.norm() < bound
            assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= agree_min
            if variant == "gpt2":  # the int8 tie: one table, looked up and multiplied
                assert type(q.tok_emb) is Int8Embedding and q.tok_emb.weight is q.lm_head.weight
                held = {dt: sum(b.numel() for b in q.buffers() if b.dtype == dt) for dt in (torch.int8, torch.uint8)}
                blocks = 2 * (4 * 32 * 32 + 2 * 32 * 128)  # 2 × (qkv, proj, up, down) weights
                # the head once; int4 blocks two weights a byte
                assert held == ({torch.int8: 61 * 32 + blocks, torch.uint8: 0} if bits == 8 else
                                {torch.int8: 61 * 32, torch.uint8: blocks // 2})
    q8 = quantize(copy.deepcopy(model), 8)
    plain, quant = list(generate(model, [1, 2, 3], 30, 0.0)), list(generate(q8, [1, 2, 3], 30, 0.0))
    assert sum(a == b for a, b in zip(plain, quant)) >= 27


def test_int4_group_size_must_divide_the_inputs():
    model = random_model(tiny_config())  # widths 32 (n_embd) and 128 (MLP hidden)
    with pytest.raises(ConfigError, match=r"does not divide .*e\.g\. 32 \(--quantize int4:32\)"):
        quantize(model, 4, group_size=24)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear | Int4Linear))  # untouched
    with pytest.raises(ConfigError, match="8 or 4"):
        quantize(model, 3)
    assert parse_quantize("int4:32")["group_size"] == 32
    for spec in ("int4:", "int8:", "int4:x", "int8:32"):  # "int4:" was int4 in groups of 128, silently
        with pytest.raises(ConfigError, match="int4:GROUP_SIZE"):
            parse_quantize(spec)
    odd = random_model(tiny_config(n_embd=12, n_head=2))  # widths 12 and 48: no common group of 16 or more
    with pytest.raises(ConfigError, match=r"or int8 \(no group of 16 or more"):  # int4:8 holds more than int8
        quantize(odd, 4)


def test_int4_groups_smaller_than_16_are_warned_of(caplog):
    """Each group adds 8 bytes (scale and zero point): below 16 inputs a group stores more than int8 does."""
    model = random_model(tiny_config())
    sizes = {g: weight_bytes(quantize(copy.deepcopy(model), 4, group_size=g)) for g in (4, 16)}
    assert sizes[4] > weight_bytes(quantize(copy.deepcopy(model), 8)) > sizes[16]
    assert "store 2.50 bytes per weight" in caplog.text and "groups of 16" not in caplog.text
    quantize(model, 8)
    with pytest.raises(ConfigError, match="quantized already"):  # a second call was silently a no-op
        quantize(model, 4, group_size=16)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Speculative decoding


@pytest.mark.parametrize("draft_kind", ["unrelated", "same", "quantized"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_plain_greedy(draft_kind, k):
    target = random_model(tiny_config(**VARIANTS["llama"]))
    draft = {"unrelated": lambda: random_model(tiny_config(n_layer=1, n_embd=16, n_head=2), seed=7),
             "same": lambda: target,
             "quantized": lambda: quantize(copy.deepcopy(target), 8)}[draft_kind]()
    for prompt in ([5], [1, 2, 3], list(range(10, 30))):
        plain = list(generate(target, prompt, 40, temperature=0.0))
        assert list(speculative_generate(target, draft, prompt, 40, k=k)) == plain


def test_speculative_runs_past_the_context_window():
    target, draft = random_model(tiny_config(block_size=16)), random_model(tiny_config(block_size=16), seed=3)
    out = list(speculative_generate(target, draft, [1, 2, 3], 50, k=4))
    assert len(out) == 50 and all(0 <= t < 61 for t in out)
    with pytest.raises(ConfigError, match="vocabulary"):
        next(speculative_generate(target, random_model(tiny_config(vocab_size=62)), [1], 5))


@pytest.mark.parametrize("prompt", [list(range(1, 40)), [1, 2, 3]])
def test_a_draft_with_a_shorter_context_leaves_the_targets_whole(prompt):
    """A draft trained with a shorter block_size drafts within its own window (restarting it several times here):
    the target still sees the whole prompt and output, which fit its window, so the greedy ids are plain greedy's.
    The window both shared cropped the 39-token prompt to the draft's 7, and the target's greedy ids changed."""
    target = random_model(tiny_config(block_size=64))
    draft = random_model(tiny_config(block_size=8, n_layer=1), seed=3)
    plain = list(generate(target, prompt, 24, temperature=0.0))
    for k in (2, 6):
        assert list(speculative_generate(target, draft, prompt, 24, k=k)) == plain


@pytest.mark.parametrize("path", ["cached", "chunked", "uncached", "speculative", "batch"])
def test_generation_ends_after_the_first_stop_id(path):
    """Every path ends after the first of the stop ids it is given, that id included (transformers' generate returns
    the EOS it stops at): the ids are the unstopped ones up to there. Two stop ids, as an imported Llama 3 has three;
    the sync_every=8 chunk drops what it drew past the stop."""
    model = random_model(tiny_config(**VARIANTS["llama"]))
    draft = random_model(tiny_config(n_layer=1, n_embd=16, n_head=2), seed=7)
    prompt = [1, 2, 3]
    free = list(generate(model, prompt, 30, temperature=0.0))
    firsts = [t for i, t in enumerate(free) if t not in free[:i]]  # each id once, where first drawn
    first, second = firsts[-2:]  # drawn first mid-chunk (positions 10 and 19 here), ids drawn after both
    cut = free.index(first)
    assert 8 < cut < free.index(second) < 29
    run = {"cached": lambda s: list(generate(model, prompt, 30, temperature=0.0, stop_ids=s)),
           "chunked": lambda s: list(generate(model, prompt, 30, temperature=0.0, sync_every=8, stop_ids=s)),
           "uncached": lambda s: list(generate(model, prompt, 30, temperature=0.0, use_cache=False, stop_ids=s)),
           "speculative": lambda s: list(speculative_generate(model, draft, prompt, 30, k=3, stop_ids=s)),
           "batch": lambda s: generate_batch(model, [prompt, [9]], 30, stop_ids=s)[0]}[path]
    assert run(()) == free
    assert run((second, first)) == free[:cut + 1]
    assert run({second}) == free[:free.index(second) + 1]
    assert run((60,) if 60 not in free else ()) == free  # an id never drawn changes nothing


def test_stream_text_ends_at_any_stop_id():
    """A sample ends at any of the tokenizer's stop_ids (excluded from the text), not only at its eot_id."""
    from transformer_lm import generate as gen
    from transformer_lm.config import SampleConfig
    from transformer_lm.tokenizers import ByteTokenizer

    class Stops(ByteTokenizer):
        eot_id, stop_ids = 0, (0, ord("!"), ord("?"))

    seen = {}

    def fake_generate(*args, **kwargs):
        seen.update(kwargs)
        return iter(b"hi?there!")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(gen, "generate", fake_generate)
        assert "".join(gen.stream_text(None, Stops(), "a", SampleConfig(max_new_tokens=9))) == "hi"
    assert seen["stop_ids"] == (0, ord("!"), ord("?"))  # and generate() itself is told, to end there


@settings(max_examples=300, deadline=None)
@given(prompt=st.text("ab\n€", max_size=6), generated=st.text("ab\n€", max_size=12),
       stops=st.lists(st.text("ab\n€", min_size=1, max_size=4), max_size=3))
def test_stop_strings_cut_the_sample_where_prompt_and_sample_first_hold_one(prompt, generated, stops):
    """Against a naive reference over the decoded prompt + sample, token by token: the sample ends before the first
    stop string that ends inside it, also one that begins in the prompt ("\n\n" after a prompt ending in "\n"
    was never found); a stop string wholly inside the prompt does not count. Bytes: "€" spans three tokens."""
    from transformer_lm import generate as gen
    from transformer_lm.config import SampleConfig
    from transformer_lm.tokenizers import ByteTokenizer

    tok, ids = ByteTokenizer(), list(generated.encode())
    ref = generated
    for i in range(1, len(ids) + 1):
        full = prompt + tok.decode(ids[:i])
        hits = [j for j in (full.find(s, max(0, len(prompt) - len(s) + 1)) for s in stops) if j >= 0]
        if hits:
            ref = full[len(prompt):max(len(prompt), min(hits))]
            break
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gen, "generate", lambda *a, **k: iter(ids))
        got = "".join(gen.stream_text(None, tok, prompt, SampleConfig(max_new_tokens=len(ids), stop=stops)))
    assert got == ref



@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_a_long_streamed_sample_decodes_a_bounded_stretch_per_token_and_the_same_text(kind):
    """Each token decoded the whole sample so far (an 8000-token char sample: 5.9 s of decoding, against 0.1 s);
    past STREAM_SETTLE ids the text is settled and decoding goes on after its last ids. The text is the naive
    decode of all the ids, cut at the first stop string, also where characters split over several byte ids and
    invalid bytes (U+FFFD) fall at the points where it settles."""
    import random

    from transformer_lm import generate as gen
    from transformer_lm.config import SampleConfig
    from transformer_lm.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer

    alphabet = "ab €😀\n"
    tok = {"byte": ByteTokenizer, "char": lambda: CharTokenizer.train([alphabet + "x"]),
           "bpe": lambda: BPETokenizer.train([alphabet * 50, "ab ab € a😀b\n" * 50], vocab_size=300)}[kind]()
    rng = random.Random(0)
    ids = [t for _ in range(1200) for t in tok.encode(rng.choice(alphabet))]
    if kind == "byte":  # lone invalid bytes and cut characters, decoded as U+FFFD
        ids = [t for i in ids for t in ([0xE2, i] if rng.random() < 0.05 else [0xFF, i] if rng.random() < 0.05
                                        else [i])]
    lengths = []
    decode = tok.decode
    tok.decode = lambda x: lengths.append(len(x)) or decode(x)
    marker = tok.encode("a€x😀")  # the stop string "€x" appears nowhere else
    with pytest.MonkeyPatch.context() as m:
        for stop, sample in (([], ids), (["€x"], ids[:len(ids) * 2 // 3] + marker + ids[len(ids) * 2 // 3:])):
            m.setattr(gen, "generate", lambda *a, sample=sample, **k: iter(sample))
            lengths.clear()
            got = "".join(gen.stream_text(None, tok, "ab", SampleConfig(max_new_tokens=len(sample), stop=stop)))
            whole = decode(sample)
            assert got == (whole[:whole.index(stop[0])] if stop else whole)
            assert len(sample) > 10 * gen.STREAM_SETTLE
            assert max(lengths) < 2 * (gen.STREAM_SETTLE + gen.STREAM_CONTEXT)

def window_starts(model: Transformer) -> list[int]:
    """Spy: the first id of every forward that starts a window (no cache, or an empty one)."""
    starts, forward = [], model.forward

    def spy(x, *a, cache=None, **k):
        if cache is None or int(cache.pos) == 0:
            starts.append(int(x[0, 0]))
        return forward(x, *a, cache=cache, **k)
    model.forward = spy
    return starts


@pytest.mark.parametrize("how", ["cached", "uncached", "speculative"])
def test_bos_stays_first_when_the_window_moves_on(how):
    """Models trained with BOS (Llama, llama2.c) expect it first: cropping a long prompt and every rebuild of a full
    window dropped it. With keep=1 it heads every window, and the ids are unchanged while the window does not move."""
    BOS = 60
    target = random_model(tiny_config(block_size=16))
    prompt = [BOS, *range(1, 25)]  # longer than the window: cropped
    if how == "speculative":
        draft = random_model(tiny_config(block_size=16, n_layer=1), seed=4)
        run = lambda p, n, keep: list(speculative_generate(target, draft, p, n, k=3, keep=keep))  # noqa: E731
    else:
        run = lambda p, n, keep: list(generate(target, p, n, 0.0, use_cache=how == "cached", keep=keep))  # noqa: E731
    starts = window_starts(target)
    out = run(prompt, 40, 1)
    assert len(out) == 40 and len(starts) >= 3 and set(starts) == {BOS}, starts
    starts.clear()
    run(prompt, 40, 0)
    assert starts[0] != BOS  # without keep, the crop and the rebuilds begin mid-text
    assert run([BOS, 3, 4], 10, 1) == run([BOS, 3, 4], 10, 0)  # within the window: the same ids


def test_a_draft_with_a_padded_table_drafts_for_the_same_tokenizer():
    """One tokenizer, tables padded differently (Qwen2-0.5B's 151,936 rows drafting for Qwen2-7B's 152,064): only
    the tokenizer's ids are drawn, so greedy output equals plain greedy; a table short of them is refused."""
    target = random_model(tiny_config(vocab_size=64))
    padded = random_model(tiny_config(vocab_size=72, n_layer=1), seed=5)
    for prompt in ([5], list(range(10, 30))):
        plain = list(generate(target, prompt, 30, temperature=0.0, vocab_size=61))
        assert list(speculative_generate(target, padded, prompt, 30, k=3, vocab_size=61)) == plain
    with pytest.raises(ConfigError, match="tokenizer 66"):
        next(speculative_generate(target, padded, [1], 5, vocab_size=66))


def test_speculative_sampling_preserves_the_target_distribution():
    """The joint distribution of the first two sampled tokens (25 outcomes over a 5-token vocabulary) against the
    exact target distribution, computed from the target alone. With k=2 the first round drafts two tokens, so both
    the accept rule min(1, p/q) and the residual draw max(0, p-q) at either position are exercised. Pearson's χ²
    with 24 degrees of freedom exceeds 51.2 with probability 1e-3 when the law is right (the seed is fixed, so the
    test is deterministic); the draft's own distribution, 0.29 away in total variation, scores in the thousands."""
    V, prompt, n = 5, [1, 3], 2000
    small = dict(vocab_size=V, n_layer=1, n_head=2, n_embd=16)
    target, draft = random_model(tiny_config(**small), 0, std=0.15), random_model(tiny_config(**small), 7, std=0.15)

    def exact(m: Transformer) -> torch.Tensor:
        with torch.no_grad():
            first = m(torch.tensor([prompt])).logits[0, -1].softmax(-1)
            second = m(torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1].softmax(-1)  # (V, V)
        return (first[:, None] * second).flatten()

    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V)
    for _ in range(n):
        a, b, _ = speculative_generate(target, draft, prompt, 3, k=2, temperature=1.0, generator=gen)
        counts[a * V + b] += 1

    def chi2(p: torch.Tensor) -> float:
        return float(((counts - n * p) ** 2 / (n * p)).sum())

    assert chi2(exact(target)) < 51.2
    assert chi2(exact(draft)) > 500  # the test can tell the draft's law from the target's


# ----------------------------------------------------------------------------------------------------------------------
# 3. Batched generation


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_generation_equals_one_by_one(variant):
    model = random_model(tiny_config(**VARIANTS[variant]))
    prompts = [[1, 2, 3], [5], list(range(10, 24)), [4, 4], [7, 8, 9, 10, 11]]
    batched = generate_batch(model, prompts, 20)
    assert batched == [list(generate(model, p, 20, temperature=0.0)) for p in prompts]
    assert generate_batch(model, [[3, 1]], 5) == [list(generate(model, [3, 1], 5, temperature=0.0))]
    assert generate_batch(model, prompts, 0) == [[] for _ in prompts]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):  # was an empty result, silently
        generate_batch(model, prompts, -3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):  # was torch's "Dimension size" error
        list(generate(model, [1], -3))
    with pytest.raises(ValueError, match="context window"):
        generate_batch(model, prompts, 60)


def test_batched_sampling_is_seeded_and_in_vocabulary():
    model = random_model(tiny_config())
    prompts = [[1], [2, 3, 4]]
    a = generate_batch(model, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = generate_batch(model, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert a == b and all(len(r) == 10 and all(0 <= t < 61 for t in r) for r in a)


def test_padded_embedding_rows_are_never_drawn():
    """Imported models pad the embedding table past the tokenizer's ids (Qwen2: 151,936 rows for 151,646 ids). Rows
    that are no token must never be drawn, greedy or sampled, one prompt, a batch or speculative; here they are made
    the most likely ones, so any path that looked at them would pick them."""
    model, tokens = random_model(tiny_config()), 50  # 61 rows, a tokenizer of 50 ids
    with torch.no_grad():
        model.lm_head.weight[tokens:] = model.lm_head.weight[:tokens].abs().amax(0) * 50
    assert int(model(torch.tensor([[1, 2]])).logits[0, -1].argmax()) >= tokens  # the trap is set
    draft = random_model(tiny_config(n_layer=1), seed=1)
    gen = torch.Generator().manual_seed(0)
    runs = [list(generate(model, [1, 2], 12, temperature=t, generator=gen, vocab_size=tokens)) for t in (0, 1, 1e-40)]
    runs += generate_batch(model, [[1, 2], [3]], 12, temperature=1.0, generator=gen, vocab_size=tokens)
    runs.append(list(speculative_generate(model, draft, [1, 2], 12, 3, 1.0, generator=gen, vocab_size=tokens)))
    greedy = list(speculative_generate(model, draft, [1, 2], 12, 3, vocab_size=tokens))
    assert greedy == runs[0]
    assert all(len(r) == 12 and max(r) < tokens for r in runs)
    ids = [1, 2]  # greedy is the argmax over the real ids only, recomputed naively
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1, :tokens].argmax()))
    assert runs[0] == ids[2:]


def test_a_tiny_temperature_tends_to_greedy_instead_of_overflowing():
    """logits / 1e-40 overflowed to inf and the softmax to NaN, whose argmax is id 0."""
    model = random_model(tiny_config())
    greedy = list(generate(model, [1, 2], 12, temperature=0))
    for t in (1e-6, 1e-38, 1e-40):
        assert list(generate(model, [1, 2], 12, temperature=t, generator=torch.Generator().manual_seed(0))) == greedy


# ----------------------------------------------------------------------------------------------------------------------
# 4. The CLI: tlm sample --quantize/--draft, tlm eval --quantize


TINY = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
        "--train.batch_size", "4", "--train.eval_batches", "2", "--train.max_iters", "6", "--train.eval_interval", "3"]


def tlm(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    from transformer_lm.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def folder_bytes(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_cli_quantize_and_draft(tmp_path, corpus_file, capsys, caplog):
    run, other = tmp_path / "run", tmp_path / "byte-run"
    for out, tokenizer in ((run, "char"), (other, "byte")):
        code, _, err = tlm(capsys, "train", corpus_file, "--out", out, "--tokenizer", tokenizer, *TINY)
        assert code == 0, err
    before = folder_bytes(run)
    greedy = ["--greedy", "true", "--max_new_tokens", "40"]
    code, plain, err = tlm(capsys, "sample", run, "def ", *greedy)
    assert code == 0, err
    for spec in ("int8", "w8a8", "int4:16"):
        code, out, err = tlm(capsys, "sample", run, "def ", *greedy, "--quantize", spec)
        assert code == 0 and out.startswith("def "), err
    code, out, err = tlm(capsys, "sample", run, "def ", *greedy, "--draft", run, "--draft_k", "3")
    assert code == 0 and out == plain, err  # speculative greedy == plain greedy, through the CLI
    with caplog.at_level(logging.WARNING):  # no compiled step to use: said, not silently dropped
        code, out, err = tlm(capsys, "sample", run, "def ", *greedy, "--draft", run, "--compile", "true")
    assert code == 0 and out == plain, err
    assert "speculative decoding with a draft runs eagerly" in caplog.text

    code, ref, err = tlm(capsys, "eval", run, "--data", corpus_file, "--json", "true")
    assert code == 0, err
    code, q8, err = tlm(capsys, "eval", run, "--data", corpus_file, "--json", "true", "--quantize", "int8")
    assert code == 0, err
    assert abs(json.loads(q8)["loss"] - json.loads(ref)["loss"]) < 0.02 * json.loads(ref)["loss"]
    code, w8, err = tlm(capsys, "eval", run, "--data", corpus_file, "--json", "true", "--quantize", "w8a8")
    assert code == 0, err
    assert abs(json.loads(w8)["loss"] - json.loads(ref)["loss"]) < 0.03 * json.loads(ref)["loss"]
    assert folder_bytes(run) == before  # quantization is applied after loading, never saved

    code, _, err = tlm(capsys, "sample", run, "def ", "--draft", other)
    assert code == 2 and "different tokenizer" in err
    code, _, err = tlm(capsys, "sample", run, "def ", "--quantize", "int3")
    assert code == 2 and "int8, w8a8, int4" in err
    code, _, err = tlm(capsys, "eval", run, "--data", corpus_file, "--quantize", "int4:24")
    assert code == 2 and "does not divide" in err
