"""Continuous batching: concurrent generations that share every forward of the model, as vLLM and TGI serve requests.
A decode step reads all the weights whatever the batch, so B rows take less than B one-row steps: on a GPU at small
batch little more than one; on this project's 2-core CPU, whose small GEMMs are not bandwidth-bound, a GPT-2 step of
8 rows took 2.9× one row's (w8a8: 1.6×), for 2.6× (3.7×) the tokens/s of taking turns (BENCHMARKS.md).

Each generation holds a row of one RowKVCache, at a position of its own. A new one joins at the next step: its
prompt is prefilled alone (into a cache of its own length, the plain causal attention), copied into a free row, and
from then on decodes in the batch; while others run, a long prompt is prefilled a chunk per step, so that they wait
a chunk's forward per step rather than its whole prefill (a window shift's re-prefill is done whole). One that
ends (its max tokens, a stop id, its reader gone) frees its row for the next in line, and the running ones are
packed into the first rows so that a step runs those alone. Every row sees exactly the positions and context
generate() gives it alone, window shifts included, so greedy ids are generate()'s, and a seeded row draws what
generate() draws with the same generator (w8a8 aside: its activation scale is the whole forward's, quantize.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

from .config import ModelConfig, check_sampling
from .decode import DecodeStats, StaticKVCache, activation_dtype, decode_step
from .generate import cache_len, check_prompt, crop_prompt, sample_next, window
from .model import KVCache, Transformer
from .perf import kv_cache_bytes, now
from .quantize import W8A8Linear
from .runtime import check_fits

log = logging.getLogger(__name__)


class RowKVCache(StaticKVCache):
    """A StaticKVCache whose rows are at positions of their own. `pos` is (B, 1, 1, 1), each row's next slot, shaped
    so that the model's attention_mask broadcasts it over (B, heads, T, S) and hides from each row the slots it has
    not written. update() writes one new position per row (a decode step) and returns the first `visible` slots, the
    most any row has written (for a compiled step rounded up as generate.cache_len does, so that a few traces serve
    every length): attention reads no slot that every row masks. first(b) is a cache of the first b rows, sharing
    their buffers: a step of b generations runs on b rows, not on all."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, buffers: dict[str, torch.Tensor] | None = None) -> None:
        if buffers is None:
            super().__init__(config, batch_size, max_len, device, dtype)
        else:  # a view of another's first rows (first()): nothing allocated
            nn.Module.__init__(self)
            self.max_len, self.n_layer = max_len, config.n_layer
            for name, buf in buffers.items():
                self.register_buffer(name, buf, persistent=False)
        self.pos = torch.zeros(batch_size, 1, 1, 1, dtype=torch.long, device=device)  # replaces the 0-d buffer
        if self.pos.is_cuda:
            torch._dynamo.mark_static_address(self.pos)
        self.visible = self.max_len
        self.config, self._views = config, {}

    def first(self, rows: int) -> RowKVCache:
        """The first `rows` rows as a cache of their own (made once per size), its `pos` its own."""
        if rows == self.k_0.size(0):
            return self
        if rows not in self._views:
            views = {name: buf[:rows] for name, buf in self.named_buffers() if name != "pos"}
            self._views[rows] = RowKVCache(self.config, rows, self.max_len, self.pos.device, self.k_0.dtype, views)
        return self._views[rows]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_buf, v_buf = self.layer(layer)
        rows, slots = torch.arange(k.size(0), device=k.device), self.pos.view(-1)
        k_buf[rows, :, slots] = k[:, :, 0].to(k_buf.dtype)  # (B, n_kv, hd) at each row's own slot
        v_buf[rows, :, slots] = v[:, :, 0].to(v_buf.dtype)
        return k_buf[:, :, :self.visible], v_buf[:, :, :self.visible]

    def place(self, row: int, prompt: KVCache, length: int, dirty: int) -> None:
        """Copy the `length` positions prefilled into `prompt` (batch 1) into `row`'s first slots, and zero its slots
        up to `dirty` that an earlier generation wrote: masked, but a masked weight of 0 times a stale inf (a float16
        overflow) would still be NaN."""
        for i in range(self.n_layer):
            for buf, new in zip(self.layer(i), (prompt.k[i, 0], prompt.v[i, 0])):
                buf[row, :, :length] = new[:, :length]
                buf[row, :, length:dirty] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` slots into row `dst`."""
        for i in range(self.n_layer):
            for buf in self.layer(i):
                buf[dst, :, :length] = buf[src, :, :length]


@dataclasses.dataclass(eq=False)
class _Generation:
    """One sample in the batch: what continuing it needs, and the queue its ids go out through (None ends it, an
    exception is re-raised to the reader)."""

    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    vocab_size: int | None
    keep: int
    stop_ids: Collection[int]
    stats: DecodeStats
    out: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    produced: int = 0
    started: float = 0.0


@dataclasses.dataclass(eq=False)
class _Prefill:
    """A prompt being prefilled chunk by chunk into a cache of its own (Batcher._fill)."""

    gen: _Generation
    kv: KVCache
    started: float
    done: int = 0


class Tokens(Iterator[int]):
    """The ids of one generation in the batch as they are drawn. close() (or leaving a `with`) gives its row up at the
    next step, drawn or not: a reader that goes away takes no more of the model's time."""

    def __init__(self, gen: _Generation) -> None:
        self._gen = gen

    def __next__(self) -> int:
        if self._gen.cancelled:
            raise StopIteration
        item = self._gen.out.get()
        if item is None:
            self._gen.cancelled = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._gen.cancelled = True
            raise item
        self._gen.stats.new_tokens += 1  # the ids read, as generate() counts the ids it yields: the batch may run ahead
        return item

    def close(self) -> None:
        self._gen.cancelled = True

    def __enter__(self) -> Tokens:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DEFAULT_CONTEXT = 8192
"""The most positions a row holds unless told: imported models have windows of 32K-128K positions, whose cache for a
batch of rows would be tens of gigabytes."""


DEFAULT_PREFILL_CHUNK = 256
"""Prompt ids prefilled per step while other generations run: GPT-2 on this project's CPU takes 0.24 s for 256,
so the running rows' next tokens come that much later, once per chunk, instead of waiting out a whole long prompt."""


class Batcher:
    """Up to `rows` generations of one Transformer decoded together (see the module docstring), by a thread that runs
    while there is work and ends when there is none. Generations beyond `rows` wait their turn in arrival order.
    Each row holds `context` positions (default: the model's window, at most DEFAULT_CONTEXT); a generation that
    fills its row shifts its window there, as generate() does at the model's window. While generations run, a new
    prompt is prefilled `prefill_chunk` ids per step, between their steps. `compile` compiles the batched
    decode step (decode.decode_step). The model is put in eval mode, and must be used by nothing else while the
    batcher works."""

    def __init__(self, model: Transformer, rows: int, compile: bool = False, context: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        block = model.config.block_size
        self.context = min(block, DEFAULT_CONTEXT if context is None else context)
        if self.context < 2:
            raise ValueError(f"context must be at least 2 positions (a prompt id and a new one), got {context}")
        self.model, self.compile = model.eval(), compile
        if rows > 1 and any(isinstance(m, W8A8Linear) for m in model.modules()):
            log.warning("w8a8 quantizes each forward's activations with one scale, so a batched sample's tokens can "
                        "differ slightly with the samples beside it; one row (tlm serve --concurrency 1) keeps them "
                        "exactly what it draws alone")
        self.device, self.dtype = model.tok_emb.weight.device, activation_dtype(model)
        check_fits(kv_cache_bytes(model.config, self.context, rows, self.dtype), self.device,
                   f"the batch's KV cache ({rows} rows × {self.context} positions)",
                   "batch fewer rows (tlm serve --concurrency) or hold fewer positions (--context)")
        self.cache = RowKVCache(model.config, rows, self.context, self.device, self.dtype)
        self.step = decode_step(compile, self.device)
        self.rows: list[_Generation | None] = [None] * rows
        self.pos = [0] * rows  # each row's next slot, on the host: nothing is read back from the device
        self.dirty = [0] * rows  # the slots each row has written since it was last zeroed
        self.waiting: collections.deque[_Generation] = collections.deque()
        self.filling: _Prefill | None = None
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)  # a driver waiting for work (drive())
        self.thread: threading.Thread | None = None
        self.driver: threading.Thread | None = None
        self.closed = False

    def submit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None,
               stats: DecodeStats | None = None, vocab_size: int | None = None, keep: int = 0,
               stop_ids: Collection[int] = ()) -> Tokens:
        """Queue a generation; its ids, as generate() with the same arguments yields them, come from the returned
        Tokens (`stats` gets generate()'s counts and timings)."""
        check_prompt(prompt, self.model.config.vocab_size)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        gen = _Generation(crop_prompt(prompt, self.context, keep), max_new_tokens, temperature,
                          top_k, top_p, generator, vocab_size, keep, stop_ids,
                          stats if stats is not None else DecodeStats())
        if max_new_tokens == 0:  # as generate(): nothing drawn, the prompt counted
            gen.stats.prompt_tokens = len(gen.ids)
            gen.out.put(None)
            return Tokens(gen)
        with self.lock:
            self.waiting.append(gen)
            if self.driver is not None:
                self.wake.notify()
            elif self.thread is None:
                self.thread = threading.Thread(target=self._work, name="tlm-batcher", daemon=True)
                self.thread.start()
        return Tokens(gen)

    def drive(self) -> None:
        """Run the batch in the calling thread, waiting for work between bursts, until close(); submit() then starts
        no thread of its own. On a CPU the thread matters: OpenMP's parallel regions run fastest from the main
        thread, whose worker threads spin between regions (the tiny model decoded 1040 tokens/s there and 750 from
        any other thread, GPT-2 5-7 % faster; measured with two threads), so `tlm serve` drives the batch from its
        main thread and answers HTTP from another."""
        with self.lock:
            self.driver = threading.current_thread()
        try:
            while True:
                with self.lock:
                    while not self.waiting and not self.closed:
                        self.wake.wait()
                    if self.closed:
                        return
                self._work()
        finally:
            self.driver = None

    def close(self, timeout: float = 10.0) -> None:
        """End every generation, running or waiting (their readers get no more ids), and wait up to `timeout` s for
        the thread to finish its step: a process exiting while it is inside a forward dies of std::terminate."""
        with self.lock:
            ended = [*self.waiting, *(gen for gen in self.rows if gen is not None)]
            if self.filling is not None:
                ended.append(self.filling.gen)
            thread, self.closed = self.thread, True
            self.wake.notify()
        for gen in ended:
            gen.cancelled = True
            gen.out.put(None)  # a reader waiting on its next id wakes up
        if thread is not None:
            thread.join(timeout)

    def load(self) -> dict[str, int]:
        """The rows, how many generations run in them and how many wait for one (a snapshot)."""
        return {"rows": len(self.rows), "running": sum(gen is not None for gen in self.rows),
                "waiting": len(self.waiting)}

    def _work(self) -> None:
        with torch.no_grad():
            while True:
                try:
                    if not self._admit_or_end():
                        return
                    self._decode()
                except Exception as e:  # noqa: BLE001 - every reader of the batch gets it, re-raised
                    for row, gen in enumerate(self.rows):
                        if gen is not None:
                            gen.out.put(e)
                            self.rows[row] = None

    def _admit_or_end(self) -> bool:
        """Free the rows of finished or abandoned generations, pack the others into the first rows, go on with the
        prompt being prefilled, and start waiting ones in the rows after them; False (the thread ends) when nothing is
        left to do."""
        for row, gen in enumerate(self.rows):
            if gen is not None and gen.cancelled:
                self.rows[row] = None
        self._pack()
        if self.filling is not None:
            self._fill()
        while self.filling is None and None in self.rows:
            with self.lock:
                gen = self.waiting.popleft() if self.waiting else None
                if gen is None and not any(self.rows):
                    self.thread = None  # under the lock: a submit from now on starts a new thread
                    return False
            if gen is None:
                return True
            if not gen.cancelled:
                kv = KVCache(self.model.config, 1, len(gen.ids), self.device, self.dtype)
                self.filling = _Prefill(gen, kv, now(self.device))
                self._fill()
            self._pack()  # a generation that ended at its first id left a hole
        return True

    def _fill(self) -> None:
        """Prefill the next `prefill_chunk` ids of the prompt under way, or all the rest when no generation runs (none
        waits on it): a long prompt delays the running rows by a chunk's forward per step, not by its whole prefill.
        The last chunk places it in the first free row (none was given to another meanwhile) and draws its first id.
        A failure is its reader's; the batch goes on."""
        fill = self.filling
        gen, ids = fill.gen, fill.gen.ids
        if gen.cancelled:
            self.filling = None
            return
        try:
            end = min(len(ids), fill.done + self.prefill_chunk) if any(self.rows) else len(ids)
            x = torch.tensor([ids[fill.done:end]], device=self.device)
            logits = self.model(x, cache=fill.kv, last_only=True).logits[:, -1]
            fill.done = end
            if end < len(ids):
                return
            self.filling = None
            self._placed(self.rows.index(None), gen, fill.kv, len(ids), logits, fill.started)
        except Exception as e:  # noqa: BLE001 - its reader gets it, re-raised
            gen.out.put(e)
            self.filling = None
            self.rows = [None if g is gen else g for g in self.rows]

    def _pack(self) -> None:
        """Move the last generations into the rows ended ones left, so that the b running are rows 0..b-1, which a
        step runs alone (RowKVCache.first): a row moved is its written slots copied, a step's work at most."""
        lo, hi = 0, len(self.rows) - 1
        while True:
            while lo < hi and self.rows[lo] is not None:
                lo += 1
            while hi > lo and self.rows[hi] is None:
                hi -= 1
            if lo >= hi:
                return
            self.cache.move(hi, lo, self.pos[hi])
            self.rows[lo], self.rows[hi], self.pos[lo] = self.rows[hi], None, self.pos[hi]
            self.dirty[lo] = max(self.dirty[lo], self.pos[hi])

    def _restart(self, row: int, gen: _Generation, ids: list[int]) -> None:
        """Prefill `ids` (a shifted window) alone, whole, into `row`, and draw the next id from their logits."""
        kv = KVCache(self.model.config, 1, len(ids), self.device, self.dtype)
        logits = self.model(torch.tensor([ids], device=self.device), cache=kv, last_only=True).logits[:, -1]
        self._placed(row, gen, kv, len(ids), logits, 0.0)

    def _placed(self, row: int, gen: _Generation, kv: KVCache, length: int, logits: torch.Tensor,
                started: float) -> None:
        """Put the `length` positions prefilled into `kv` in `row` for `gen`, and draw its next id from `logits`."""
        self.rows[row] = gen
        self.cache.place(row, kv, length, self.dirty[row])
        self.pos[row] = self.dirty[row] = length
        if not gen.produced:  # the first prefill (a window shift's is counted in the decode time, as generate does)
            gen.stats.prompt_tokens, gen.stats.prefill_s = length, now(self.device) - started
            gen.started = time.perf_counter()
        self._draw(row, gen, logits)

    def _decode(self) -> None:
        """One forward of the running generations' rows (the first b: _pack), then a draw for each. A compiled step
        runs a power of two of rows, as it does of slots (a trace per size): free ones run on id 0 at slot 0, never
        read."""
        running = sum(gen is not None for gen in self.rows)
        if not running:
            return
        b = min(len(self.rows), 1 << (running - 1).bit_length()) if self.compile else running
        cache = self.cache.first(b)
        pos = [p if gen is not None else 0 for p, gen in zip(self.pos[:b], self.rows[:b])]
        last = [gen.ids[-1] if gen is not None else 0 for gen in self.rows[:b]]
        cache.visible = cache_len(max(pos) + 1, cache.max_len, self.compile)
        positions = torch.tensor(pos, device=self.device)[:, None]  # (b, 1)
        cache.pos.copy_(positions.view(-1, 1, 1, 1))
        logits = self.step(self.model, cache, torch.tensor(last, device=self.device)[:, None], positions, None)
        for row in range(b):
            gen = self.rows[row]
            if gen is None:
                self.dirty[row] = max(self.dirty[row], 1)
                continue
            self.pos[row] += 1
            self.dirty[row] = max(self.dirty[row], self.pos[row])
            self._draw(row, gen, logits[row:row + 1])

    def _draw(self, row: int, gen: _Generation, logits: torch.Tensor) -> None:
        """Draw `gen`'s next id from `logits` (1, vocab) and send it; end the generation where generate() would, or
        shift its window (restart from the recent half, as generate() does) when its row has no slot left."""
        tok = int(sample_next(logits, gen.temperature, gen.top_k, gen.top_p, gen.generator, gen.vocab_size))
        gen.ids.append(tok)
        gen.produced += 1
        gen.stats.context = self.pos[row]
        gen.stats.decode_s = time.perf_counter() - gen.started
        gen.out.put(tok)
        if gen.produced == gen.max_new_tokens or tok in gen.stop_ids:
            gen.out.put(None)
            self.rows[row] = None
        elif self.pos[row] == self.cache.max_len:
            self._restart(row, gen, window(gen.ids, max(1, self.context // 2), gen.keep))
