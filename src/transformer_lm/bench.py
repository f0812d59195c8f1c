"""`tlm bench`: our model against Hugging Face transformers' implementation of the same model, on this device, in
one run.

Both models have the same config and the same weights: ours is initialized, then copied into transformers'
GPT2LMHeadModel / LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM through interop.hf's export mapping, and
their logits must agree before anything is timed, and again after the training rows (which step each model with its
own optimizer and loss: theirs then takes our trained weights for the inference rows). Each measurement is repeated
in interleaved rounds (ours, theirs, ours, theirs, ...) after a warm-up of each, so that load on a shared machine
slows both alike; the median counts.

- train: one optimizer step — forward with loss, backward, clip to 1.0, AdamW step (same settings for both),
  zero_grad — on batch × seq random tokens (each model's own loss: ours computes the head and the loss together,
  loss.py; transformers builds the logits and calls cross-entropy on them);
- prefill: a prompt of `prefill_len` tokens (1024 for gpt2) into an empty KV cache, last-position logits only (what
  generation needs; transformers' `logits_to_keep=1`: ours also runs its last block past the Q/K/V projection on
  the last position alone, theirs at every position, and both are charged the FLOPs ours needs,
  accounting.prefill_flops_per_token); each library's cache as its generate() gets one: ours the static cache the
  model keeps from call to call (zeroed; decode.lent_cache), theirs a new DynamicCache per call;
- decode: `new_tokens` (128) greedy tokens after a 16-token prompt, batch 1 (our generate(), their generate()) and
  batch `decode_batch`; the whole call is timed, the short prefill included (gpt-fast times 200 tokens this way; at
  32 tokens the 16-token prefill was ~7 % of our call and pulled the reading below the decode steps' own rate).

Prefill and decode run our model as `tlm sample` does: after the training row, layout.decode_layout (weights stored
[in, out] where that is faster) and, for the quantized row, quantize() on top of it.

MFU (model FLOPs utilization) is reported for train and prefill against perf.peak_flops (a datasheet figure, or a
measured matmul on unknown devices such as CPUs); MBU (bytes read per token ÷ measured copy bandwidth) for decode,
against the median of copy bandwidths probed before each of its rounds: on a shared machine the bandwidth drifts
by 10-40 % within minutes (a neighbour's load), so a start-up figure can be far from the one the row ran under, and
a single probe is noisier than the decode timings themselves (17-28 GB/s between rounds that decoded within ±5 %).
Peak memory is that of a call after the warm-up (_measure): the allocator's peak on CUDA, the peak resident-set
growth on CPU.
"""

from __future__ import annotations

import copy
import ctypes
import os
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .accounting import count_params, flops_per_token, prefill_flops_per_token
from .config import ModelConfig, preset
from .decode import lent_cache, prefill
from .errors import ConfigError
from .generate import generate, generate_batch
from .interop.hf import hf_state_dict
from .layout import decode_layout
from .model import Transformer
from .optim import fused_adamw
from .perf import (
    copy_bandwidth,
    decode_bytes_per_token,
    kv_cache_bytes,
    mbu,
    measured_copy_bandwidth,
    mfu,
    now,
    peak_flops,
    synchronize,
)
from .quantize import check_quantize, parse_quantize
from .quantize import quantize as quantize_model
from .runtime import check_fits, resolve_device

PROMPT_LEN = 16
"""Prompt tokens before decoding."""
NEW_TOKENS = 128
"""Greedy tokens per decode measurement, by default (fewer where the block size has no room for them)."""


@dataclass
class Row:
    """One measurement of both contenders: tokens per second, peak memory and utilization (MFU or MBU)."""

    name: str
    tokens: int
    """Tokens one repetition processes (trained, prefilled or generated)."""
    ours_s: list[float] = field(default_factory=list)
    theirs_s: list[float] = field(default_factory=list)
    ours_peak: int | None = None
    theirs_peak: int | None = None
    util_kind: str = "MFU"
    util_per_token: float = 0.0
    """FLOPs (MFU) or bytes (MBU) per token of ours; theirs, the same model, is charged the same."""
    theirs_util_per_token: float | None = None
    """When theirs differs (ours quantized against their float weights)."""
    bandwidths: list[float] = field(default_factory=list)
    """MBU rows: the copy bandwidth (bytes/s) probed before each round; their median is the row's bandwidth."""

    def tokens_per_s(self, ours: bool) -> float:
        times = self.ours_s if ours else self.theirs_s
        return self.tokens / statistics.median(times) if times else float("nan")

    @property
    def ratio(self) -> float:
        return self.tokens_per_s(True) / self.tokens_per_s(False)

    @property
    def paired_ratio(self) -> float:
        """Median over rounds of theirs/ours time in the same round: robust to load that comes and goes."""
        return statistics.median(t / o for o, t in zip(self.ours_s, self.theirs_s))

    def util(self, ours: bool, peak: float, bandwidth: float) -> float:
        """MFU against `peak`; MBU against the median bandwidth probed during the row, else against `bandwidth`."""
        per_token = self.util_per_token if ours or self.theirs_util_per_token is None else self.theirs_util_per_token
        if self.util_kind == "MFU":
            return mfu(per_token, self.tokens_per_s(ours), peak)
        return mbu(per_token, self.tokens_per_s(ours), statistics.median(self.bandwidths or [bandwidth]))


@dataclass
class BenchResult:
    preset: str
    family: str
    params: int
    device: str
    threads: int
    peak_flops: float
    bandwidth: float
    max_logit_diff: float
    """Ours vs theirs on the same input before timing: the models are the same."""
    rows: list[Row]
    settings: dict[str, Any]

    def table(self) -> str:
        """The results as a plain-text table, with ours/theirs ratios."""
        probed = [bw for r in self.rows for bw in r.bandwidths]
        rounds = f" (during the decode rows {min(probed) / 1e9:.1f}-{max(probed) / 1e9:.1f})" if probed else ""
        head = (f"{self.preset} ({self.params / 1e6:.2f}M params, transformers {self.family}) on {self.device}, "
                f"{self.threads} threads; peak {self.peak_flops / 1e9:.0f} GFLOP/s, copy bandwidth "
                f"{self.bandwidth / 1e9:.1f} GB/s{rounds}; max |Δlogit| ours vs theirs {self.max_logit_diff:.1e}")
        cols = f"{'measurement':<18}{'ours tok/s':>12}{'theirs tok/s':>14}{'ours/theirs':>13}{'(paired)':>10}" \
               f"{'ours peak MB':>14}{'theirs peak MB':>16}{'util':>6}{'ours':>8}{'theirs':>8}"
        lines = [head, cols]
        for r in self.rows:
            def mb(v: int | None) -> str:
                return f"{v / 2**20:.0f}" if v is not None else "n/a"
            lines.append(f"{r.name:<18}{r.tokens_per_s(True):>12.1f}{r.tokens_per_s(False):>14.1f}{r.ratio:>12.2f}x"
                         f"{r.paired_ratio:>9.2f}x{mb(r.ours_peak):>14}{mb(r.theirs_peak):>16}{r.util_kind:>6}"
                         f"{r.util(True, self.peak_flops, self.bandwidth):>8.1%}"
                         f"{r.util(False, self.peak_flops, self.bandwidth):>8.1%}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        rows = [{"name": r.name, "tokens": r.tokens, "ours_tokens_per_s": r.tokens_per_s(True),
                 "theirs_tokens_per_s": r.tokens_per_s(False), "ratio": r.ratio, "paired_ratio": r.paired_ratio,
                 "ours_peak_bytes": r.ours_peak, "theirs_peak_bytes": r.theirs_peak, "util_kind": r.util_kind,
                 "ours_util": r.util(True, self.peak_flops, self.bandwidth),
                 "theirs_util": r.util(False, self.peak_flops, self.bandwidth), "ours_s": r.ours_s,
                 "theirs_s": r.theirs_s, "bandwidths": r.bandwidths} for r in self.rows]
        return {"preset": self.preset, "family": self.family, "params": self.params, "device": self.device,
                "threads": self.threads, "peak_flops": self.peak_flops, "bandwidth": self.bandwidth,
                "max_logit_diff": self.max_logit_diff, "settings": self.settings, "rows": rows}


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory


def _rss() -> int | None:
    """Resident set size in bytes (Linux); None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PeakMemory:
    """Peak memory a block adds: the CUDA allocator's peak over what was allocated before, or on CPU the peak
    resident set (sampled every millisecond) over the resident set before, freed heap returned to the system first
    (glibc's malloc_trim) so that memory the previous contender freed does not hide this one's."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._base = _rss()
        self._max = self._base
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            rss = _rss()
            if rss is not None and rss > self._max:
                self._max = rss

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(0, max(self._max, _rss() or 0) - self._base)


# ----------------------------------------------------------------------------------------------------------------------
# The two models


def hf_equivalent(model: Transformer) -> tuple[nn.Module, str]:
    """transformers' model of `model`'s family with `model`'s weights (sdpa attention, eval mode), and the family."""
    import transformers

    from .interop.hf import config_to_hf, infer_family

    family = infer_family(model.config)
    hf_cfg = config_to_hf(model.config, family)
    cls = getattr(transformers, hf_cfg.pop("architectures")[0])
    hf_cfg.pop("dtype", None)
    config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    hf = cls._from_config(config, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, family), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ConfigError(f"transformers' {family} model does not take our weights: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    hf.loss_type = "ForCausalLM"  # what it picks anyway, minus a warning
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return hf.to(model.tok_emb.weight.device).eval(), family


@torch.no_grad()
def check_same(ours: Transformer, theirs: nn.Module, family: str, probe: torch.Tensor) -> float:
    """Max |Δlogit| of the two models on `probe` (B, T) ids; ConfigError unless they agree (the benchmark would
    compare different models)."""
    diff = (ours.eval()(probe).logits - theirs.eval()(probe).logits).abs().max().item()
    if not diff < 1e-3:  # also catches NaN
        raise ConfigError(f"our model and transformers' {family} disagree (max |Δlogit| {diff:.2e}); the benchmark "
                          "would compare different models")
    return diff


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, hf: bool) -> None:
    x = tokens[:, :-1]
    loss = model(input_ids=x, labels=x, use_cache=False).loss if hf else model(x, tokens[:, 1:]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _train_row(ours: Transformer, theirs: nn.Module, tokens: torch.Tensor, steps: int, device: torch.device,
               compile: bool = False) -> Row:
    """Training steps of both models with identical AdamW settings (the optimizers are dropped afterwards); with
    `compile`, ours runs through torch.compile as `tlm train --train.compile true` runs it (compiled in the warm-up)."""
    fused = fused_adamw(device)  # the fastest AdamW, so that optimizer time dilutes the two models' difference least
    opts = [torch.optim.AdamW(m.train().parameters(), lr=1e-4, weight_decay=0.1, fused=fused, foreach=not fused)
            for m in (ours, theirs)]
    B, T = tokens.size(0), tokens.size(1) - 1
    forward = torch.compile(ours) if compile else ours
    row = _measure(Row("train compiled" if compile else "train", B * T,
                       util_per_token=flops_per_token(ours.config, T)["train"]),
                   lambda: _train_step(forward, opts[0], tokens, False),
                   lambda: _train_step(theirs, opts[1], tokens, True), steps, device)
    for m in (ours, theirs):
        m.eval().zero_grad(set_to_none=True)
    return row


def _measure(row: Row, ours: Callable[[], object], theirs: Callable[[], object], steps: int,
             device: torch.device, probe: Callable[[], float] | None = None) -> Row:
    """Warm each up once, then measure each one's peak memory over a second call (the first contender's first call
    also paid the process's one-time allocations: the tiny preset's training read 26 MB ours / 23 theirs in one
    order, 15 / 36 in the other), then `steps` interleaved timed repetitions, each round after a call of `probe`
    (its result kept in row.bandwidths)."""
    ours(), theirs()
    for fn, is_ours in ((ours, True), (theirs, False)):
        with PeakMemory(device) as mem:
            fn()
        if is_ours:
            row.ours_peak = mem.peak
        else:
            row.theirs_peak = mem.peak
    for i in range(steps):
        if probe is not None:
            row.bandwidths.append(probe())
        pair = ((ours, row.ours_s), (theirs, row.theirs_s))
        for fn, times in (pair if i % 2 == 0 else pair[::-1]):  # alternate who goes first
            start = now(device)
            fn()
            times.append(now(device) - start)
    return row


def bench(preset_name: str = "gpt2", model: dict[str, Any] | None = None, device: str = "auto",
          steps: int = 3, batch: int = 1, seq: int | None = None, prefill_len: int = 1024,
          new_tokens: int | None = None, decode_batch: int = 8, quantize: str | None = None, compile: bool = False,
          seed: int = 0) -> BenchResult:
    """Measure our model against transformers' on the preset's config (with `model` field overrides): training,
    prefill and decode tokens/s, peak memory, MFU/MBU, in `steps` interleaved repetitions each.

    `seq` defaults to the block size (training), `prefill_len` is capped at the block size, `new_tokens` defaults to
    NEW_TOKENS or what the block size leaves after the prompt; `quantize` (int8, int4, int4:G, w8a8) adds a decode
    row of ours with quantized weights against their float weights; `compile` adds a training row with our model
    compiled and compiles our decode step (compiling happens in the untimed warm-up; theirs stays eager, as
    transformers runs by default)."""
    if min(steps, batch, decode_batch, prefill_len, *(v for v in (seq, new_tokens) if v is not None)) < 1:
        raise ConfigError("steps, batch, seq, decode_batch, new_tokens and prefill_len must be >= 1")
    dev = resolve_device(device)
    config = ModelConfig(**{**preset(preset_name), "dropout": 0.0, **(model or {})})
    if config.arch != "transformer":  # it failed in the export mapping: "cannot export an lstm model to Hugging Face"
        raise ConfigError(f"bench compares our Transformer with transformers' implementation of it, and transformers "
                          f"has no {config.arch} language model; `tlm experiment speed` times the recurrent baselines "
                          "against a Transformer of their size")
    seq = seq or config.block_size
    prefill_len = min(prefill_len, config.block_size)
    if seq > config.block_size:
        raise ConfigError(f"--seq {seq} is longer than the block size {config.block_size}; give --seq <= "
                          f"{config.block_size}")
    room = config.block_size - PROMPT_LEN
    new_tokens = min(NEW_TOKENS, room) if new_tokens is None else new_tokens
    if not 1 <= new_tokens <= room:
        raise ConfigError(f"{PROMPT_LEN} prompt + {new_tokens} new tokens do not fit the block size "
                          f"{config.block_size}; give --new_tokens <= {room}")
    # now, not after minutes: both models with gradients and AdamW's two moments (16 bytes a parameter each, fp32;
    # activations not counted), and both KV caches of the batched decode
    check_fits(2 * 16 * count_params(config).total, dev, f"training {preset_name} (ours and transformers', "
               "weights, gradients and AdamW state)", "choose a smaller --preset")
    check_fits(2 * kv_cache_bytes(config, PROMPT_LEN + new_tokens, decode_batch), dev, f"decoding {decode_batch} "
               "sequences (our KV cache and transformers')", "give a smaller --decode_batch")
    torch.manual_seed(seed)
    ours = Transformer(config).to(dev).init_weights(seed=seed)
    if quantize:  # now, not after minutes of float measurements
        check_quantize(ours, **parse_quantize(quantize))
    theirs, family = hf_equivalent(ours)
    gen = torch.Generator().manual_seed(seed)

    def ids(b: int, t: int) -> torch.Tensor:
        return torch.randint(config.vocab_size, (b, t), generator=gen).to(dev)

    probe = ids(2, min(64, config.block_size))
    diff = check_same(ours, theirs, family, probe)

    tokens = ids(batch, seq + 1)
    rows = [_train_row(ours, theirs, tokens, steps, dev)]
    if compile:
        rows.append(_train_row(ours, theirs, tokens, steps, dev, compile=True))
    # Each optimizer stepped its own model on its own loss (transformers' over seq - 1 targets, ours over seq): the
    # tiny preset's logits then differed by 1.2 (its largest is 1.8). The inference rows run one set of weights.
    theirs.load_state_dict(hf_state_dict(ours, family), strict=False)
    diff = max(diff, check_same(ours, theirs, family, probe))
    decode_layout(ours)  # inference as `tlm sample` runs it: transposed weights where that is faster
    with torch.no_grad():
        prompt = ids(1, prefill_len)

        def ours_prefill() -> object:
            with lent_cache(ours, 1, prefill_len) as cache:  # as generate() takes it: the model's kept cache
                return prefill(ours, cache, prompt)

        rows.append(_measure(
            Row("prefill", prefill_len, util_per_token=prefill_flops_per_token(config, prefill_len)),
            ours_prefill, lambda: theirs(prompt, use_cache=True, logits_to_keep=1), steps, dev))

        def decode_row(name: str, model: Transformer, b: int) -> Row:
            prompts = ids(b, PROMPT_LEN)
            context = PROMPT_LEN + new_tokens // 2  # the mean number of cached positions a step reads
            row = Row(name, b * new_tokens, util_kind="MBU",
                      util_per_token=decode_bytes_per_token(model, config, context, b),
                      theirs_util_per_token=decode_bytes_per_token(theirs, config, context, b))
            if b == 1:
                def ours_fn() -> object:
                    return list(generate(model, prompts[0].tolist(), new_tokens, temperature=0, compile=compile))
            else:
                def ours_fn() -> object:
                    return generate_batch(model, prompts.tolist(), new_tokens, compile=compile)

            def theirs_fn() -> object:
                return theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False)

            return _measure(row, ours_fn, theirs_fn, steps, dev, lambda: measured_copy_bandwidth(dev, repeats=3))

        rows.append(decode_row("decode batch 1", ours, 1))
        rows.append(decode_row(f"decode batch {decode_batch}", ours, decode_batch))
        if quantize:
            quantized = quantize_model(copy.deepcopy(ours), **parse_quantize(quantize))
            rows.append(decode_row(f"decode 1 {quantize}", quantized, 1))

    settings = {"steps": steps, "batch": batch, "seq": seq, "prefill_len": prefill_len, "prompt_len": PROMPT_LEN,
                "new_tokens": new_tokens, "decode_batch": decode_batch, "quantize": quantize, "compile": compile,
                "seed": seed, "torch": torch.__version__}
    return BenchResult(preset_name, family, ours.num_params(), str(dev), torch.get_num_threads(),
                       peak_flops(dev, torch.float32), copy_bandwidth(dev), diff, rows, settings)

