"""The static KV cache and the decode steps (decode.py): the same logits and greedy tokens as a full recomputation,
for every position encoding, a sliding window and grouped-query heads; the compiled step equal to the eager one; the
eager fallback when compiling fails; sampling on the device. CPU, float32, no timing."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import random_model
from transformer_lm import generate as generate_module
from transformer_lm import runtime
from transformer_lm.config import ModelConfig
from transformer_lm.decode import (
    _KEPT,
    DecodeStats,
    StaticKVCache,
    _with_eager_fallback,
    compiled_decode_step,
    decode_one_token,
    lent_cache,
    prefill,
    release_cache,
)
from transformer_lm.errors import ConfigError
from transformer_lm.generate import cache_len, generate, generate_batch, sample_next
from transformer_lm.model import KVCache, Transformer
from transformer_lm.speculative import speculative_generate

CONFIGS = {
    "learned": dict(pos_encoding="learned"),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "rope": dict(pos_encoding="rope"),
    "sliding-window": dict(pos_encoding="rope", sliding_window=5),
    "gqa": dict(pos_encoding="rope", n_kv_head=2, mlp="swiglu", norm="rmsnorm"),
    "mqa-window": dict(pos_encoding="learned", n_kv_head=1, sliding_window=7),
}


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32), **overrides})


def full_recompute_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_cache_logits_and_greedy_equal_full_recompute(name):
    config = tiny_config(**CONFIGS[name])
    model = random_model(config, seed=11, std=0.5)
    idx = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx).logits  # (2, 30, V)
        cache = StaticKVCache(config, 2, max_len=30)
        steps = [prefill(model, cache, idx[:, :9])]
        for t in range(9, 30):
            steps.append(decode_one_token(model, cache, idx[:, t:t + 1]))
        assert int(cache.pos) == 30
        # fp32 rounding only (logits up to ~10 here, differently summed in a longer masked attention)
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:], atol=1e-4, rtol=1e-4)

        # the buffers hold what the dynamic cache holds, at the same slots, up to the same fp32 rounding: a 9-row
        # prefill, one-row steps and one 30-row forward are differently shaped matmuls (2-4e-6 apart in layer 0 on
        # this CPU, 1-2.4e-5 in layer 1, on keys of up to 14: past assert_close's default atol of 1e-5)
        dynamic = KVCache(config, 2)
        model(idx, cache=dynamic)
        torch.testing.assert_close(cache.k, dynamic.k[:, :, :, :30], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.v, dynamic.v[:, :, :, :30], atol=1e-4, rtol=1e-4)

    prompt = idx[0, :6].tolist()
    greedy = list(generate(model, prompt, 20, temperature=0))  # generate() decodes with the static cache
    assert greedy == full_recompute_greedy(model, prompt, 20)
    assert len(set(greedy)) > 1  # a constant stream would prove little


def test_cached_generation_under_autocast_equals_the_uncached():
    """Sampling inside torch.autocast (as nanoGPT's sample.py does) with fp32 weights: the static cache, allocated in
    the weights' dtype, refused autocast's bf16 keys (index_copy_ dtype mismatch); the uncached path worked."""
    model = random_model(tiny_config(pos_encoding="rope"), seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = list(generate(model, [1, 2, 3], 12, temperature=0))
        plain = list(generate(model, [1, 2, 3], 12, temperature=0, use_cache=False))
    assert cached == plain and len(set(cached)) > 1


def test_generate_syncs_in_chunks_and_fills_stats():
    """Tokens reach the host `sync_every` at a time: the ids do not depend on the chunking, and stats count them."""
    config = tiny_config(block_size=16)
    model = random_model(config, seed=5)
    prompt = [1, 2, 3, 4, 5]
    ref = list(generate(model, prompt, 40, temperature=0, sync_every=1))  # runs past the window: restarts
    for every in (3, 8, 64):
        stats = DecodeStats()
        assert list(generate(model, prompt, 40, temperature=0, sync_every=every, stats=stats)) == ref
        assert (stats.prompt_tokens, stats.new_tokens) == (5, 40)
        assert stats.decode_s > 0 and stats.prefill_s > 0


def test_generations_reuse_the_models_cache_and_match_fresh_ones():
    """A model lends its cache from one generation to the next of the same shape; a reused cache gives exactly what a
    new one gives (its old slots zeroed), interleaved generations never share one, and a new shape replaces it."""
    config = tiny_config()
    model = random_model(config, seed=4, std=0.5)
    with lent_cache(model, 1, 30) as first:
        pass
    with lent_cache(model, 1, 30) as again:
        assert again is first and int(again.pos) == 0
        assert all(not buf.any() for buf in again.buffers())
        # a stale inf in a slot the mask hides would turn into NaN (0 x inf): reset must clear it
        again.k_1.fill_(float("inf"))
    long_prompt, short_prompt = list(range(3, 25)), [7, 1, 9]
    # 22 + 8 and 3 + 27 positions: the same 30 slots, so the second call gets the first one's used cache
    assert list(generate(model, long_prompt, 8, temperature=0)) == full_recompute_greedy(model, long_prompt, 8)
    reused = list(generate(model, short_prompt, 27, temperature=0))
    assert reused == full_recompute_greedy(model, short_prompt, 27) and len(set(reused)) > 1
    release_cache(model)
    with lent_cache(model, 1, 30) as fresh:
        assert fresh is not first

    a, b = generate(model, long_prompt, 8, temperature=0), generate(model, short_prompt, 27, temperature=0)
    out_a, out_b = [next(a)], [next(b)]  # both started: each holds its own cache
    for x, y in zip(a, b):
        out_a.append(x)
        out_b.append(y)
    out_b.extend(b)
    assert (out_a, out_b) == (full_recompute_greedy(model, long_prompt, 8), reused)

    with lent_cache(model, 2, 30) as wider:
        assert wider.k_0.shape[0] == 2
    prompts = [[5, 6, 7, 8], [2]]
    first_batch = generate_batch(model, prompts, 9)
    assert generate_batch(model, prompts, 9) == first_batch == [
        full_recompute_greedy(model, p, 9) for p in prompts]


def test_a_cache_kept_from_inference_mode_is_not_written_outside_it():
    """A generation under torch.inference_mode() (as inference scripts run it) left the model a cache of inference
    tensors, and the next generation outside that mode died writing it: 'Inplace update to inference tensor outside
    InferenceMode is not allowed'. Either order now gives the same ids."""
    model = random_model(tiny_config(), seed=4, std=0.5)
    prompt = [3, 1, 4, 1, 5]
    ref = full_recompute_greedy(model, prompt, 12)
    for _ in range(2):
        with torch.inference_mode():
            assert list(generate(model, prompt, 12, temperature=0)) == ref
        assert list(generate(model, prompt, 12, temperature=0)) == ref
        assert generate_batch(model, [prompt, [2]], 12)[0] == ref

def test_compile_failure_falls_back_to_eager_with_one_warning(caplog):
    config = tiny_config()
    model = random_model(config)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no C++ compiler\nmore detail")

    step = _with_eager_fallback(broken)
    tok = torch.tensor([[3]])
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        a, b = StaticKVCache(config, 1, 8), StaticKVCache(config, 1, 8)
        for _ in range(3):
            torch.testing.assert_close(step(model, a, tok, None, None), decode_one_token(model, b, tok))
    assert len(calls) == 1  # not retried
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()


def test_a_compiled_step_serves_many_lengths_from_a_few_cache_sizes(monkeypatch):
    """A compiled step is traced for one cache shape, so compiled generations round their cache up to a power of two
    (at least 64, at most the block): a server's requests of any length reuse a handful of traces. Eager ones keep
    the exact length. The ids are those of a full recompute either way (the extra slots stay masked)."""
    assert [cache_len(n, 1024, True) for n in (1, 64, 65, 144, 600, 2000)] == [64, 64, 128, 256, 1024, 1024]
    assert [cache_len(n, 1024, False) for n in (1, 144, 2000)] == [1, 144, 1024]
    model = random_model(tiny_config(block_size=256), seed=4, std=0.5)
    monkeypatch.setattr(generate_module, "decode_step", lambda compile, device: decode_one_token)  # no compile wait
    for prompt, new, slots in (([3, 1, 4], 5, 64), ([3, 1, 4], 70, 128), (list(range(1, 40)), 100, 256)):
        assert list(generate(model, prompt, new, temperature=0, compile=True)) == \
            full_recompute_greedy(model, prompt, new)
        assert _KEPT[model].max_len == slots
    list(generate(model, [3, 1, 4], 5, temperature=0))
    assert _KEPT[model].max_len == 8


@pytest.mark.slow
def test_compiled_decode_step_equals_eager():
    """Compiling takes ~20 s on a 2-core CPU (hence slow); afterwards every step reuses the one trace."""
    config = tiny_config(**CONFIGS["gqa"], sliding_window=6)
    model = random_model(config, seed=1, std=0.1)
    idx = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    step = compiled_decode_step()
    with torch.no_grad():
        a, b = StaticKVCache(config, 1, 20), StaticKVCache(config, 1, 20)
        prefill(model, a, idx[:, :4])
        prefill(model, b, idx[:, :4])
        for t in range(4, 20):
            torch.testing.assert_close(step(model, a, idx[:, t:t + 1], None, None),
                                       decode_one_token(model, b, idx[:, t:t + 1]), atol=1e-5, rtol=1e-5)
    prompt = idx[0, :5].tolist()
    assert list(generate(model, prompt, 12, temperature=0, compile=True)) == full_recompute_greedy(model, prompt, 12)


def test_exponential_race_sampling_matches_the_distribution():
    """sample_next draws argmax p/E (E ~ Exp(1)): frequencies within 5 standard errors of p, filtered ids never."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20000, -1)
    draws = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    se = (probs * (1 - probs) / len(draws)).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * se + 1e-9), freq
    assert freq[4] == 0
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(top2.tolist()) == {0, 1}


@pytest.mark.parametrize("n", [1, 2, 20])
def test_decode_tokens_per_s_counts_the_forwards_the_decode_time_holds(n, monkeypatch):
    """The first new token comes from the prefill's logits, so decode_s holds n - 1 forwards: n / decode_s was
    --verbose's rate (2x at 2 tokens; at 1 token, with no forward at all, an MBU of 112%)."""
    model = random_model(tiny_config(block_size=64), seed=5)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    stats = DecodeStats()
    assert len(list(generate(model, [1, 2, 3], n, temperature=0, stats=stats))) == n
    assert stats.decode_steps == len(calls) - 1  # the forwards after the prefill
    if n == 1:
        assert math.isnan(stats.decode_tokens_per_s)
    else:
        assert stats.decode_tokens_per_s == pytest.approx((len(calls) - 1) / stats.decode_s)

PATHS = {"generate": lambda m, p, n, **kw: list(generate(m, p, n, **kw)),
         "batch": lambda m, p, n, **kw: generate_batch(m, [[1], p], n, **kw),
         "speculative": lambda m, p, n, **kw: list(speculative_generate(m, m, p, n, **kw))}


@pytest.mark.parametrize("path", list(PATHS))
def test_generation_refuses_arguments_with_no_meaning(path):
    """What SampleConfig refuses, refused by the functions that take it directly: a temperature of -0.01 drew the
    least likely id, top_k 0 failed inside torch, top_p 0 and a NaN temperature drew id 0 every time; an id of
    another tokenizer was torch's 'index out of range in self', naming neither it nor the table; speculative
    decoding of -3 tokens returned nothing."""
    model, run = random_model(tiny_config(vocab_size=61)), PATHS[path]
    for bad, match in ((dict(temperature=-0.01), "temperature must be >= 0"),
                       (dict(temperature=float("nan")), "temperature must be >= 0"),
                       (dict(top_k=0), "top_k must be >= 1"), (dict(top_p=0.0), r"top_p must be in \(0, 1\]")):
        with pytest.raises(ConfigError, match=match):
            run(model, [1], 3, **bad)
    for bad in (61, -1):
        with pytest.raises(ValueError, match=f"prompt id {bad} is outside the model's embedding table of 61 rows"):
            run(model, [5, bad], 3)
    with pytest.raises(ValueError, match="non-empty prompt"):
        run(model, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        run(model, [1], -3)
    # a draft's smaller table bounds the ids too
    target = random_model(tiny_config(vocab_size=70, n_layer=1))
    with pytest.raises(ValueError, match="embedding table of 61 rows"):
        list(speculative_generate(target, model, [5, 65], 3, vocab_size=61))

def test_cli_sample_verbose_reports_decode_speed_and_mbu(tmp_path, corpus_file, capsys):
    from transformer_lm.cli import main

    run = tmp_path / "run"
    assert main(["train", str(corpus_file), "--out", str(run), "--tokenizer", "char", "--model.n_layer", "1",
                 "--model.n_head", "2", "--model.n_embd", "16", "--model.block_size", "32", "--train.batch_size", "2",
                 "--train.max_iters", "2", "--train.eval_interval", "2", "--train.eval_batches", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "def ", "--max_new_tokens", "20", "--greedy", "true", "--verbose", "true"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ")
    assert "prefill 4 tokens at" in err and "decode 20 tokens (19 forwards) at" in err and "MBU" in err, err
    assert main(["sample", str(run), "def ", "--max_new_tokens", "1", "--greedy", "true", "--verbose", "true"]) == 0
    err = capsys.readouterr().err
    assert "no decode step" in err and "MBU" not in err, err


def test_a_kv_cache_larger_than_free_memory_is_refused(monkeypatch):
    """The size is checked against the free memory before allocating: on Linux an oversized CPU tensor is granted
    and the process is killed once it is written. 2 layers × (k, v) × 3 × 2 heads × 8 × 8 fp32 = 6,144 bytes."""
    config = ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16)
    monkeypatch.setattr(runtime, "free_memory", lambda device: 6_144)
    StaticKVCache(config, 3)  # fits exactly
    monkeypatch.setattr(runtime, "free_memory", lambda device: 6_143)
    with pytest.raises(ConfigError, match="KV cache of 3 sequences × 8 positions needs"):
        StaticKVCache(config, 3)
