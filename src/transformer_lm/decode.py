"""Fast decoding, as gpt-fast does it: a static KV cache, small pure prefill and single-token decode steps, and an
optionally compiled decode step.

Nothing changes shape from one decode step to the next: the cache is preallocated, one key and one value buffer of
(batch, kv_heads, max_len, head_dim) per layer, new keys and values are written with `index_copy_` at a position kept
in a device tensor, and attention covers all max_len slots behind a causal mask. So `torch.compile` traces
`decode_one_token` once, and the decode loop never waits for the host (sampling too stays on the device: see
generate.sample_next).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .model import Transformer
from .perf import kv_cache_bytes
from .runtime import check_fits

log = logging.getLogger(__name__)

DecodeStep = Callable[[Transformer, "StaticKVCache", torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                      torch.Tensor]


class StaticKVCache(nn.Module):
    """Keys and values of every layer in buffers of fixed size, written at the positions `pos` (a 0-d long tensor
    on the device) onwards. update() returns all max_len slots; the model masks those not yet written (the causal
    mask does: slot s is visible to a query at position p only when s <= p).

    Each layer has its own pair of buffers (k_0, v_0, ...), as gpt-fast's and transformers' static caches do: an
    in-place write into a view of one (layers, ...) buffer is functionalized by torch.compile into a rewrite of the
    whole buffer, every layer, every step (GPT-2 with 1024 slots: 9 compiled tokens/s instead of 40;
    benchmarks/long_context_decode.py)."""

    static = True

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.max_len = min(max_len or config.block_size, config.block_size)
        self.n_layer = config.n_layer
        shape = (batch_size, config.kv_heads, self.max_len, config.head_dim)
        check_fits(kv_cache_bytes(config, self.max_len, batch_size, dtype), torch.device(device or "cpu"),
                   f"a KV cache of {batch_size} sequences × {self.max_len} positions",
                   "generate fewer sequences at once or fewer tokens")
        for i in range(config.n_layer):
            self.register_buffer(f"k_{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("pos", torch.zeros((), device=device, dtype=torch.long), persistent=False)
        if self.pos.is_cuda:  # updated in place by a CUDA-graphed decode step: their addresses must never change
            for t in self.buffers():
                torch._dynamo.mark_static_address(t)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers (B, n_kv, max_len, hd) of `layer`."""
        return getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")

    @property
    def k(self) -> torch.Tensor:
        """Every layer's keys, (layers, B, n_kv, max_len, hd), as KVCache.k holds them (a copy)."""
        return torch.stack([self.layer(i)[0] for i in range(self.n_layer)])

    @property
    def v(self) -> torch.Tensor:
        """Every layer's values, like `k`."""
        return torch.stack([self.layer(i)[1] for i in range(self.n_layer)])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) of `layer` at slots pos..pos+T-1; return every slot (B, n_kv, max_len, hd),
        or, while filling from empty (from_start), just the T slots written."""
        k_buf, v_buf = self.layer(layer)
        if not self.static:
            T = k.size(2)
            k_buf[:, :, :T] = k
            v_buf[:, :, :T] = v
            return k_buf[:, :, :T], v_buf[:, :, :T]
        slots = self.pos + torch.arange(k.size(2), device=k.device)  # (T,)
        k_buf.index_copy_(2, slots, k.to(k_buf.dtype))  # under autocast k is bf16 where the cache is the weights'
        v_buf.index_copy_(2, slots, v.to(v_buf.dtype))
        return k_buf, v_buf

    @contextlib.contextmanager
    def from_start(self) -> Iterator[None]:
        """Within, the cache acts as a dynamic one filled from slot 0 (the caller guarantees pos == 0): update()
        returns only the slots written, so a prompt's attention is the plain causal one (no mask over all max_len
        slots, the masked-out half of the work skipped: the 1024-token GPT-2 prefill ran about 1.1× faster with it)."""
        self.static = False
        try:
            yield
        finally:
            self.static = True

    def reset(self) -> None:
        """Start over at slot 0, every slot zeroed as in a new cache: the mask hides old slots, but a masked weight
        of 0 times a stale inf (a float16 overflow) would still be NaN."""
        for buf in self.buffers():
            buf.zero_()


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The floating-point dtype `model` computes in: that of its first floating-point parameter (not simply the token
    embedding's, which quantize() may turn into int8)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


_KEPT: weakref.WeakKeyDictionary[nn.Module, StaticKVCache] = weakref.WeakKeyDictionary()
"""Each Transformer's cache from its last generation, to be lent again (see lent_cache); it goes with the model."""


@contextlib.contextmanager
def lent_cache(model: nn.Module, batch_size: int, max_len: int) -> Iterator[nn.Module]:
    """A KV cache for one generation. A Transformer keeps the StaticKVCache of its last generation and lends it,
    reset, to the next one of the same batch size and length, as gpt-fast sets its caches up once for all calls. A
    new cache is allocated and zero-filled, its pages faulted in afresh whenever the allocator has returned the last
    call's memory to the system (GPT-2 at 1024 slots: 75 MB; a 1024-token prefill 2-5 % faster with the kept one on
    this CPU, BENCHMARKS.md); zeroing the kept one is one pass over memory already there, and a CUDA-graphed decode
    step, recorded against the cache's addresses, finds the same addresses again.

    A generation that starts while another holds the kept cache (two generate() iterators interleaved) gets its own,
    so they never share one. Any other model (a recurrent baseline) brings a new cache of its own every time.
    `release_cache(model)` frees the kept one."""
    if not isinstance(model, Transformer):
        yield model.make_cache(batch_size, max_len)
        return
    device, dtype = model.tok_emb.weight.device, activation_dtype(model)
    kept = _KEPT.pop(model, None)
    # a cache made under torch.inference_mode() holds inference tensors, which only that mode may write in place
    inference = kept is not None and kept.pos.is_inference() and not torch.is_inference_mode_enabled()
    if kept is not None and not inference and (kept.k_0.size(0), kept.max_len, kept.k_0.device, kept.k_0.dtype) == (
            batch_size, min(max_len, model.config.block_size), device, dtype):
        cache = kept
        cache.reset()
    else:
        del kept  # freed before the new one is allocated
        cache = StaticKVCache(model.config, batch_size, max_len, device, dtype)
    try:
        yield cache
    finally:
        _KEPT[model] = cache


def release_cache(model: nn.Module) -> None:
    """Free the KV cache `model` keeps from its last generation (a long-context model's can be gigabytes)."""
    _KEPT.pop(model, None)


def prefill(model: Transformer, cache: StaticKVCache, idx: torch.Tensor, positions: torch.Tensor | None = None,
            key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt ids (B, T) through the model into `cache`; -> the last position's logits (B, vocab)."""
    if isinstance(cache, StaticKVCache) and positions is None and key_mask is None and int(cache.pos) == 0:
        with cache.from_start():
            return model(idx, cache=cache, last_only=True).logits[:, -1]
    return model(idx, cache=cache, last_only=True, positions=positions, key_mask=key_mask).logits[:, -1]


def decode_one_token(model: Transformer, cache: StaticKVCache, tok: torch.Tensor, positions: torch.Tensor | None = None,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step: the newest ids (B, 1) in, next-token logits (B, vocab) out, the cache one slot further.
    Only the last position goes through the LM head (the largest matmul for big vocabularies)."""
    return model(tok, cache=cache, last_only=True, positions=positions, key_mask=key_mask).logits[:, -1]


def _with_eager_fallback(compiled: DecodeStep) -> DecodeStep:
    """`compiled`, or decode_one_token from the first compile failure on (with one warning)."""
    state = {"failed": False}

    def step(*args: object) -> torch.Tensor:
        if not state["failed"]:
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler error (no C++ toolchain, unsupported op, ...)
                state["failed"] = True
                log.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly instead",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return decode_one_token(*args)

    return step


@functools.cache
def compiled_decode_step(cuda_graphs: bool = False) -> DecodeStep:
    """decode_one_token compiled once per process (shapes are static, so one trace serves every step of a run).
    `cuda_graphs` (on CUDA) also records the step as a CUDA graph replayed whole ("reduce-overhead"), as gpt-fast
    does: a small model's decode step is otherwise bound by kernel launches, not by reading the weights. Without
    (on a CPU), Inductor writes the code that calls the step's kernels in C++ instead of Python (`cpp_wrapper`): a
    GPT-2 step 1.03-1.05× faster in fp32 and 1.09× with w8a8 on this CPU, for a longer first compile (~28 s instead
    of ~6 s; Inductor caches it on disk). Inductor's checks of every input's sizes and strides at each call are left
    out: dynamo's guards already check them before the graph runs (the step's fixed cost went from 1.50 to 1.37 ms
    on this CPU). Measurements in BENCHMARKS.md."""
    from torch._inductor import config as inductor_config  # imported here: only compiling needs it

    # cudagraphs: what mode="reduce-overhead" sets
    options = {"size_asserts": False, "triton.cudagraphs": cuda_graphs, "cpp_wrapper": not cuda_graphs}
    if not cuda_graphs and hasattr(inductor_config.cpp, "enable_floating_point_contract_flag"):
        # Let the C++ compiler fuse a multiply and an add into one FMA: the compiled int8 loop's step (quantize.py)
        # 1.11x faster on this CPU (BENCHMARKS.md). The option is recent, hence the check.
        options["cpp.enable_floating_point_contract_flag"] = "fast"
    return _with_eager_fallback(torch.compile(decode_one_token, dynamic=False, options=options))


def decode_step(compile: bool = False, device: torch.device | None = None) -> DecodeStep:
    """The decode step to use: compiled (falling back to eager on failure; CUDA graphs on a CUDA device) or eager."""
    return compiled_decode_step(device is not None and device.type == "cuda") if compile else decode_one_token


@dataclass
class DecodeStats:
    """Timings of one generation, filled in by generate() when given one: enough for tokens/s and MBU."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    """Wall time from the end of prefill to the last token on the host."""
    context: int = 0
    """Cached positions at the end (what the last step read back)."""
    finish_reason: str = ""
    """Why the sample ended, in OpenAI's words (generate.stream_text sets it): "stop" at a stop id or stop string,
    "length" at max_new_tokens."""

    @property
    def decode_steps(self) -> int:
        """Forwards within decode_s, one per token after the first: the first new token is drawn from the prefill's
        logits, and the last one needs no forward."""
        return max(0, self.new_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode forwards per second (NaN without one: a single new token is the prefill's)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 and self.decode_steps else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

