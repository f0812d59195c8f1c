"""Continuous batching (batching.py): every generation in the batch yields exactly what generate() yields for it
alone (itself tested against a full recomputation and transformers' models), whenever it joins, for every position
encoding, a sliding window, grouped-query heads and window shifts; seeded sampling draws generate()'s ids; a long
prompt is prefilled in chunks between the others' steps; a generation closed early gives its row to the next in line;
close() and drive() end and run the batch; a failing step reaches its readers and the batcher goes on. CPU, float32,
no timing."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from conftest import random_model
from test_decode import CONFIGS, tiny_config
from transformer_lm.batching import Batcher, RowKVCache
from transformer_lm.decode import DecodeStats
from transformer_lm.generate import generate
from transformer_lm.model import KVCache
from transformer_lm.quantize import _dynamic_kernels, quantize

PROMPTS = [[5, 6, 7, 8], [2], list(range(1, 20)), [9, 3, 9, 3, 9, 3, 1]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_greedy_ids_are_generates_alone_whenever_they_join(name: str) -> None:
    """Four generations in two rows: the later ones wait, then join a batch whose other row is mid-generation; 40
    new ids past a 32-position window make every row shift its window at its own step."""
    model = random_model(tiny_config(**CONFIGS[name]), seed=11, std=0.5)
    lengths = [40, 9, 25, 3]
    expected = [list(generate(model, p, n, temperature=0)) for p, n in zip(PROMPTS, lengths)]
    batcher = Batcher(model, rows=2)
    first = batcher.submit(PROMPTS[0], lengths[0], temperature=0)
    got = [[next(first)]]  # the first is under way before the others arrive
    rest = [batcher.submit(p, n, temperature=0) for p, n in zip(PROMPTS[1:], lengths[1:])]
    got[0].extend(first)
    got.extend(list(tokens) for tokens in rest)
    assert got == expected


def test_rows_of_fewer_positions_than_the_window_shift_there() -> None:
    """A 16-position context on a 32-position model: each row shifts where generate() shifts with a 16-position
    window (rope: the same weights at either block size)."""
    model = random_model(tiny_config(pos_encoding="rope"), seed=4, std=0.5)
    short = random_model(tiny_config(pos_encoding="rope", block_size=16), seed=4, std=0.5)
    batcher = Batcher(model, rows=2, context=16)
    streams = [batcher.submit(p, 30, temperature=0) for p in PROMPTS]
    got = [list(s) for s in streams]
    assert got == [list(generate(short, p, 30, temperature=0)) for p in PROMPTS]
    assert got != [list(generate(model, p, 30, temperature=0)) for p in PROMPTS]  # the shift changed what follows
    with pytest.raises(ValueError, match="context must be at least 2"):
        Batcher(model, rows=1, context=0)


def test_seeded_samples_draw_generates_ids_and_stop_at_a_stop_id() -> None:
    model = random_model(tiny_config(pos_encoding="rope"), seed=2, std=0.5)
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.2, top_p=0.8)]
    expected = [list(generate(model, p, 30, generator=_gen(i), **kw)) for i, (p, kw) in enumerate(zip(PROMPTS,
                                                                                                  settings))]
    batcher = Batcher(model, rows=3)
    streams = [batcher.submit(p, 30, generator=_gen(i), **kw) for i, (p, kw) in enumerate(zip(PROMPTS, settings))]
    assert [list(s) for s in streams] == expected
    assert len(set(map(tuple, expected))) == 3

    stop = expected[0][4]  # an id the first sample draws: generate() ends after it, and so does its row
    alone = list(generate(model, PROMPTS[0], 30, generator=_gen(0), temperature=1.0, stop_ids={stop}))
    stats = DecodeStats()
    assert list(batcher.submit(PROMPTS[0], 30, generator=_gen(0), temperature=1.0, stop_ids={stop},
                               stats=stats)) == alone
    assert alone[-1] == stop and len(alone) <= 5
    assert (stats.prompt_tokens, stats.new_tokens) == (len(PROMPTS[0]), len(alone))


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_others_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(tiny_config(pos_encoding="rope"), seed=8, std=0.5)
    batcher = Batcher(model, rows=2, prefill_chunk=4)
    events: list[str] = []
    step, fill = batcher.step, batcher._fill
    monkeypatch.setattr(batcher, "step", lambda *a: (events.append("step"), step(*a))[1])
    monkeypatch.setattr(batcher, "_fill", lambda: (events.append("fill"), fill())[1])
    running = batcher.submit([1, 2, 3], 10**6, temperature=0)
    first = [next(running)]  # alone: its prompt prefilled whole, in one go
    long = batcher.submit(PROMPTS[2], 5, temperature=0)  # 19 ids: 5 chunks of 4, between the running row's steps
    assert list(long) == list(generate(model, PROMPTS[2], 5, temperature=0))
    first.extend(next(running) for _ in range(24))
    running.close()
    assert first == list(generate(model, [1, 2, 3], 25, temperature=0))
    fills = [i for i, e in enumerate(events) if e == "fill"]
    assert len(fills) == 6 and all("step" in events[a:b] for a, b in zip(fills[1:], fills[2:]))
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Batcher(model, rows=1, prefill_chunk=0)


def test_a_closed_generation_gives_its_row_to_the_next() -> None:
    model = random_model(tiny_config(), seed=3, std=0.5)
    batcher = Batcher(model, rows=1)
    stats = DecodeStats()
    endless = batcher.submit([1, 2, 3], 10**9, temperature=1.0, stats=stats)
    next(endless)
    while endless._gen.produced < 10:  # the batch runs ahead of its reader
        time.sleep(0.001)
    assert stats.new_tokens == 1  # what was read counts, as generate() counts what it yields (a stop string's cut)
    waiting = batcher.submit(PROMPTS[1], 6, temperature=0)
    assert batcher.load() == {"rows": 1, "running": 1, "waiting": 1}
    endless.close()
    assert list(waiting) == list(generate(model, PROMPTS[1], 6, temperature=0))
    assert list(endless) == []
    if batcher.thread is not None:
        batcher.thread.join(5)
    assert batcher.rows == [None] and batcher.thread is None  # nothing left to do: the thread ended
    assert list(batcher.submit([4], 0)) == []


def test_close_ends_running_and_waiting_generations() -> None:
    model = random_model(tiny_config(), seed=3, std=0.5)
    batcher = Batcher(model, rows=1)
    running, waiting = batcher.submit([1, 2], 10**9, temperature=1.0), batcher.submit([3], 10**9)
    next(running)
    batcher.close()
    rest = list(running)  # the ids drawn before close, then the end
    assert len(rest) < 10**3 and list(waiting) == []
    assert batcher.thread is None and batcher.rows == [None]


def test_a_driven_batch_runs_in_the_drivers_thread_until_closed() -> None:
    """drive() (what `tlm serve` runs in its main thread): submit() starts no thread; the driver decodes bursts of
    work as they come and returns at close()."""
    model = random_model(tiny_config(pos_encoding="rope"), seed=2, std=0.5)
    batcher = Batcher(model, rows=2)
    driver = threading.Thread(target=batcher.drive)
    driver.start()
    for _ in range(2):  # the driver waits between them
        streams = [batcher.submit(p, 12, temperature=0) for p in PROMPTS]
        assert [list(s) for s in streams] == [list(generate(model, p, 12, temperature=0)) for p in PROMPTS]
        assert batcher.thread is None
    batcher.close()
    driver.join(5)
    assert not driver.is_alive() and batcher.driver is None


def test_a_failing_step_reaches_its_readers_and_the_batcher_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(tiny_config(), seed=5, std=0.5)
    batcher = Batcher(model, rows=2)
    real = batcher.step

    def failing(*args: object) -> torch.Tensor:
        if None not in batcher.rows:  # the first step of both together (the first needs 20)
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(batcher, "step", failing)
    a, b = batcher.submit([1, 2], 20, temperature=0), batcher.submit([3], 20, temperature=0)
    for tokens in (a, b):
        with pytest.raises(RuntimeError, match="out of memory"):
            list(tokens)
    assert list(batcher.submit([1, 2], 5, temperature=0)) == list(generate(model, [1, 2], 5, temperature=0))
    with pytest.raises(ValueError, match="embedding table"):
        batcher.submit([model.config.vocab_size], 3)


def test_w8a8_batching_warns_that_rows_share_an_activation_scale(caplog: pytest.LogCaptureFixture) -> None:
    if not _dynamic_kernels():
        pytest.skip("no fbgemm int8 kernels in this PyTorch")
    model = quantize(random_model(tiny_config(), seed=6, std=0.5), 8, dynamic=True)
    with caplog.at_level(logging.WARNING, logger="transformer_lm.batching"):
        Batcher(model, rows=1)
        assert not caplog.records
        Batcher(model, rows=4)
    assert "--concurrency 1" in caplog.text and len(caplog.records) == 1


def test_rows_at_their_own_positions_attend_to_their_own_past_only() -> None:
    """The RowKVCache against the plain cache: two rows placed at different lengths decode one step together and
    get each the logits of its sequence run alone."""
    config = tiny_config(pos_encoding="rope", n_kv_head=2)
    model = random_model(config, seed=7, std=0.5)
    seqs = [[4, 8, 15, 16, 23, 42], [7, 7]]
    cache = RowKVCache(config, 2, config.block_size, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for row, ids in enumerate(seqs):
            prompt = KVCache(config, 1, len(ids) - 1)
            model(torch.tensor([ids[:-1]]), cache=prompt)
            cache.place(row, prompt, len(ids) - 1, dirty=config.block_size)  # stale slots zeroed
        pos = torch.tensor([len(s) - 1 for s in seqs])
        cache.pos.copy_(pos.view(-1, 1, 1, 1))
        cache.visible = int(pos.max()) + 1
        logits = model(torch.tensor([[s[-1]] for s in seqs]), cache=cache, positions=pos[:, None]).logits[:, -1]
        alone = torch.cat([model(torch.tensor([s])).logits[:, -1] for s in seqs])
    torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)
    assert cache.pos.view(-1).tolist() == [len(s) for s in seqs]


def test_concurrent_submitters_each_get_their_own_ids() -> None:
    """Generations submitted from many threads at once, more than there are rows."""
    model = random_model(tiny_config(pos_encoding="learned"), seed=9, std=0.5)
    batcher = Batcher(model, rows=3)
    prompts = [[i + 1, (3 * i) % 61] for i in range(8)]
    got: dict[int, list[int]] = {}

    def client(i: int) -> None:
        got[i] = list(batcher.submit(prompts[i], 12, temperature=0))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [got[i] for i in range(8)] == [list(generate(model, p, 12, temperature=0)) for p in prompts]


@pytest.mark.slow
def test_the_compiled_batched_step_gives_the_eager_ids() -> None:
    """Compiling takes ~10 s on a 2-core CPU (hence slow): one trace per visible length (64 and 128 here)."""
    model = random_model(tiny_config(pos_encoding="rope", block_size=128), seed=1, std=0.5)
    batcher = Batcher(model, rows=2, compile=True)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    streams = [batcher.submit(p, 70, temperature=0) for p in prompts]
    assert [list(s) for s in streams] == [list(generate(model, p, 70, temperature=0)) for p in prompts]
