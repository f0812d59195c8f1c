"""Generation (generate.py) against independent references: cached greedy decoding against full recomputation at
every step (inside the window and past it), chunked prefill against one forward pass, prompt cropping, and
sampling's distributions against their formulas (greedy limits, top-k, temperature and top-p frequencies)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from test_model import random_ids, tiny_config
from transformer_lm.generate import crop_prompt, generate, sample_next
from transformer_lm.model import KVCache, Transformer

# ----------------------------------------------------------------------------------------------------------------------
# KV cache


GEN_CONFIGS = {
    "learned": dict(pos_encoding="learned"),
    "rope": dict(pos_encoding="rope"),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "gqa-rope": dict(pos_encoding="rope", n_kv_head=2),
    "mqa-learned": dict(pos_encoding="learned", n_kv_head=1),
}


def greedy_reference(model: Transformer, prompt: list[int], n: int, context_start) -> list[int]:
    """Greedy decoding recomputing the full forward each step over ids[context_start(ids):]."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            start = context_start(ids)
            logits = model(torch.tensor([ids[start:]])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", list(GEN_CONFIGS))
def test_cached_generation_equals_recomputation(name):
    """Cached greedy decoding equals uncached decoding while everything fits in the window. Past the window they
    differ by design: uncached recomputes over the last block_size tokens (a sliding window) while the cache is
    rebuilt from the last block_size // 2 tokens, placed at positions 0.. (see generate's docstring). So past the
    window the cached run is compared with a full recomputation over exactly the context that policy defines."""
    block, n_prompt, n_new = 16, 5, 40
    config = tiny_config(block_size=block, **GEN_CONFIGS[name])
    model = random_model(config, seed=11, std=0.5)
    prompt = random_ids(config, 1, n_prompt, seed=11)[0].tolist()

    cached = list(generate(model, prompt, n_new, temperature=0, use_cache=True))
    uncached = list(generate(model, prompt, n_new, temperature=0, use_cache=False))
    assert len(cached) == len(uncached) == n_new
    assert all(0 <= t < config.vocab_size for t in cached + uncached)
    assert not model.training

    # Within the window (contexts of at most block_size ids) both must agree exactly.
    in_window = block - n_prompt + 1
    assert cached[:in_window] == uncached[:in_window]
    assert len(set(cached)) > 1  # a degenerate constant stream would prove little

    # The uncached run is the sliding-window reference.
    assert uncached == greedy_reference(model, prompt, n_new, lambda ids: max(0, len(ids) - block))

    # The cached run is a full recomputation over the context the cache holds: it restarts from the last half window
    # whenever the next token would not fit.
    state = {"start": 0}

    def cache_policy_start(ids: list[int]) -> int:
        if len(ids) - state["start"] > block:
            state["start"] = len(ids) - block // 2
        return state["start"]

    assert cached == greedy_reference(model, prompt, n_new, cache_policy_start)


@pytest.mark.parametrize("name", list(GEN_CONFIGS))
def test_chunked_prefill_equals_full_forward(name):
    config = tiny_config(block_size=24, **GEN_CONFIGS[name])
    model = random_model(config, seed=5)
    idx = random_ids(config, 2, 22, seed=5)
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(config, batch_size=2)
        pieces = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 9), (9, 10), (10, 22))]
        assert cache.pos == 22
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)

        last = model(idx, last_only=True).logits
        assert last.shape == (2, 1, config.vocab_size)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)

        cache = KVCache(config, batch_size=2)
        model(idx[:, :15], cache=cache, last_only=True)
        last_cached = model(idx[:, 15:], cache=cache, last_only=True).logits
        assert last_cached.shape == (2, 1, config.vocab_size)
        torch.testing.assert_close(last_cached, full[:, -1:], atol=1e-5, rtol=1e-5)

        with pytest.raises(ValueError, match="context window"):
            model(idx[:, :3], cache=cache)  # 22 + 3 > 24

        # The eager path with a cache: a chunk's queries see the whole past and their own causal prefix.
        cache = KVCache(config, batch_size=2)
        model(idx[:, :9], cache=cache, return_attentions=True)
        out = model(idx[:, 9:], cache=cache, return_attentions=True)
        torch.testing.assert_close(out.logits, full[:, 9:], atol=1e-5, rtol=1e-5)
        for w in out.attentions:
            assert w.shape == (2, config.n_head, 13, 22)
            torch.testing.assert_close(w.sum(-1), torch.ones(2, config.n_head, 13))
            assert torch.all(w.triu(diagonal=9 + 1) == 0)  # query 9+t sees keys 0..9+t
            assert torch.all(w[..., :, :10] > 0)


def test_crop_prompt_with_block_size_one_keeps_the_last_token():
    assert crop_prompt([1, 2, 3], 1) == [3]


def test_cached_generation_with_block_size_one():
    config = tiny_config(block_size=1, pos_encoding="learned")
    model = random_model(config, seed=4, std=0.5)
    uncached = list(generate(model, [3], 6, temperature=0, use_cache=False))
    assert uncached == greedy_reference(model, [3], 6, lambda ids: len(ids) - 1)  # a bigram model
    assert list(generate(model, [3], 6, temperature=0, use_cache=True)) == uncached


def test_crop_prompt_keeps_the_last_block_size_minus_one_ids():
    assert crop_prompt(list(range(10)), 4) == [7, 8, 9]
    assert crop_prompt([5, 6], 4) == [5, 6]


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def test_sample_next_greedy_limits_are_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    argmax = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature=0), argmax)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=gen), argmax)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=gen), argmax)
    assert torch.equal(sample_next(logits, temperature=0.7, top_p=1e-6, generator=gen), argmax)


def test_sample_next_top_k_never_leaves_the_top_k():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, 30, generator=gen)  # fairly flat: outside tokens would be drawn often if allowed
    k = 3
    top = torch.topk(logits, k, dim=-1).indices
    for temperature in (1.0, 5.0):
        drawn = sample_next(logits, temperature=temperature, top_k=k, generator=gen)
        assert (drawn[:, None] == top).any(dim=-1).all()
        assert len(set(drawn.tolist())) > k  # rows differ, so the draws span many ids overall


def frequencies(ids: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(ids, minlength=n).double() / ids.numel()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(temperature=1.0), [0.5, 0.3, 0.2]),
        # temperature T raises probabilities to the power 1/T before renormalizing
        (dict(temperature=2.0), [x / sum(y ** 0.5 for y in (0.5, 0.3, 0.2)) for x in (0.5 ** 0.5, 0.3 ** 0.5,
                                                                                       0.2 ** 0.5)]),
        (dict(temperature=1.0, top_k=2), [0.625, 0.375, 0.0]),
        # nucleus 0.7: token 0 (mass before it 0) and token 1 (0.5 < 0.7) stay; token 2 (0.8 ≥ 0.7) is dropped
        (dict(temperature=1.0, top_p=0.7), [0.625, 0.375, 0.0]),
        (dict(temperature=1.0, top_p=0.5), [1.0, 0.0, 0.0]),
    ],
)
def test_sample_next_frequencies(kwargs, expected):
    n = 20_000
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(n, 3).clone()
    gen = torch.Generator().manual_seed(1234)
    freq = frequencies(sample_next(logits, generator=gen, **kwargs), 3)
    # binomial standard deviation at n = 20k is at most 0.0036; 0.015 is over 4 sigma
    torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float64), atol=0.015, rtol=0)
    for i, p in enumerate(expected):
        if p == 0.0:
            assert freq[i] == 0.0
