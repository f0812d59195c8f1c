"""Plan a training run before spending on it: compute, the Chinchilla-optimal size, time, energy and memory.

Formulas, each in one place:

- Training compute. For a parameter count N alone: C = 6·N·D (Kaplan et al. 2020: 2 FLOPs per weight per token
  forward, twice that backward). For an architecture: `accounting.flops_per_token`'s training FLOPs × D, i.e. 6 × the
  weights of every matmul (Q/K/V, output projection, feed-forward, LM head) plus the attention score and value
  matmuls at the full context (no causal halving), also × 3 for the backward pass.
- Chinchilla-optimal size (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"): the rule of thumb
  of about 20 training tokens per parameter. With C = 6·N·D and D = 20·N: N = √(C / 120), D = 20·N.
- Time: C / (GPUs × peak FLOP/s × MFU), MFU being the model-FLOPs utilization (assumed, or measured on a real run).
- Energy: GPU-hours × TDP × PUE — an upper-bound estimate (accelerators rarely sit at TDP), facility overhead in PUE.
- Memory per device for training with AdamW: 16 bytes per parameter (fp32 weights and gradients and two fp32
  moments, as `accounting.training_memory`; mixed precision with an fp32 master copy is also 16 bytes, Rajbhandari
  et al. 2020, ZeRO), either replicated on every device (DDP) or sharded across them (FSDP / ZeRO-3). Activations
  depend on batch size and activation checkpointing and are not included.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..accounting import count_params, flops_per_token
from ..config import ModelConfig
from ..errors import ConfigError
from ..perf import ACCELERATORS, Precision, accelerator

CHINCHILLA_TOKENS_PER_PARAM = 20.0
"""Hoffmann et al. 2022's compute-optimal ratio of training tokens to parameters (rule of thumb)."""
TRAIN_BYTES_PER_PARAM = 16
"""Weights + gradients + AdamW's two moments, fp32 (or bf16 weights/gradients + fp32 master and moments)."""
INFERENCE_BYTES_PER_PARAM = 2
"""bf16 weights."""

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_count(value: str | float | int, what: str = "value") -> float:
    """A positive count from a number or a string such as "175B", "1.4T", "300e9", "3.14e23" (k, M, B/G, T, P)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtTpP]?)\s*", str(value))
        if m is None:
            raise ConfigError(f"{what} must be a number such as 175e9, 175B or 1.4T, got {value!r}")
        number = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{what} must be a positive number, got {value!r}")
    return number


def training_flops(params: float, tokens: float) -> float:
    """C = 6·N·D: forward (2 FLOPs per weight per token) plus backward (twice the forward)."""
    return 6.0 * params * tokens


def chinchilla_optimal(compute: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) that spend `compute` FLOPs compute-optimally: C = 6·N·D with D = r·N, so N = √(C / 6r), D = r·N."""
    if compute <= 0 or tokens_per_param <= 0:
        raise ConfigError("compute and tokens per parameter must be positive")
    n = math.sqrt(compute / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


@dataclass
class HardwareEstimate:
    """Time, energy and memory fit of one plan on one accelerator type."""

    hardware: str
    precision: Precision
    peak_tflops: float
    mfu: float
    gpus: int
    pue: float
    seconds: float
    gpu_hours: float
    energy_kwh: float | None
    """None when the vendor publishes no TDP."""
    tdp_watts: float | None
    memory_gb: float
    fits_replicated: bool
    """Training state (16 B/param) fits on one device (DDP)."""
    fits_sharded: bool
    """Training state fits when sharded across `gpus` devices (FSDP / ZeRO-3)."""
    note: str = ""

    @property
    def days(self) -> float:
        return self.seconds / 86400


@dataclass
class Plan:
    """Compute, Chinchilla-optimal size and per-accelerator cost of training `params` parameters on `tokens`."""

    params: float
    """N: total parameters (from the config, or as given)."""
    non_embedding_params: float | None
    seq_len: int | None
    """Training context the attention FLOPs are counted at (None for a bare parameter count)."""
    tokens: float
    """D: training tokens."""
    dense_flops: float
    """6 × matmul weights × D (6·N·D for a bare parameter count)."""
    attention_flops: float
    """Attention score and value matmuls, training (0 for a bare parameter count: no architecture)."""
    compute_budget: float
    """The FLOPs the Chinchilla-optimal size is computed for: --compute, else this plan's total."""
    optimal_params: float
    optimal_tokens: float
    memory_bytes: dict[str, float]
    """Per device: training state replicated, sharded, and bf16 inference weights."""
    estimates: list[HardwareEstimate] = field(default_factory=list)
    config: dict[str, Any] | None = None

    @property
    def total_flops(self) -> float:
        return self.dense_flops + self.attention_flops

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_flops"] = self.total_flops
        d["tokens_per_param"] = self.tokens_per_param
        d["chinchilla_tokens_per_param"] = CHINCHILLA_TOKENS_PER_PARAM
        for e, obj in zip(d["estimates"], self.estimates):
            e["days"] = obj.days
        return d


def plan(params: float | None = None, config: ModelConfig | None = None, tokens: float | None = None,
         compute: float | None = None, hardware: str = "H100-SXM", mfu: float = 0.4, gpus: int = 1,
         pue: float = 1.0, precision: Precision = "bf16", seq_len: int | None = None) -> Plan:
    """Plan training of a model given as a bare parameter count `params` or an architecture `config` (or neither,
    with `compute`: the Chinchilla-optimal model for that budget).

    Tokens default to `compute` / (training FLOPs per token) when a budget is given, else to the Chinchilla-optimal
    20 per parameter. `hardware` names an accelerator of `ACCELERATORS`, or "all" for every one that publishes a
    peak at `precision`. `seq_len` is the training context for the attention FLOPs (default: block_size), so it
    needs `config`."""
    if params is not None and config is not None:
        raise ConfigError("give either a parameter count or a model config, not both")
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu must be in (0, 1], got {mfu}")
    if gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    if pue < 1:
        raise ConfigError(f"pue must be >= 1 (1.0 counts the accelerators only), got {pue}")
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be bf16 or fp32, got {precision!r}")
    for name, v in (("params", params), ("tokens", tokens), ("compute", compute)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a positive number, got {v}")

    non_embedding: float | None = None
    if config is not None:
        counts = count_params(config)
        n, non_embedding = float(counts.total), float(counts.non_embedding)
        if seq_len is not None and not 1 <= seq_len <= config.block_size:
            raise ConfigError(f"seq_len must be in [1, block_size={config.block_size}], got {seq_len}")
        per_token = flops_per_token(config, seq_len)
        dense_per_token = per_token["train"] - 3 * per_token["attention_forward"]
        attention_per_token = 3 * per_token["attention_forward"]
    else:
        if seq_len is not None:  # a bare count has no attention for the context to count (it was ignored)
            raise ConfigError(f"seq_len {seq_len} sets the context of the attention FLOPs, which need an architecture; "
                              "give a model (--preset / --model.*) instead of a parameter count, or drop --seq_len")
        if params is None:
            if compute is None:
                raise ConfigError("nothing to plan: give a model (preset or config), a parameter count or a compute "
                                  "budget")
            params, tokens = chinchilla_optimal(compute) if tokens is None else (compute / (6 * tokens), tokens)
        n = float(params)
        dense_per_token, attention_per_token = 6.0 * n, 0.0
    if tokens is None:
        tokens = compute / (dense_per_token + attention_per_token) if compute is not None \
            else CHINCHILLA_TOKENS_PER_PARAM * n
    dense, attention = dense_per_token * tokens, attention_per_token * tokens
    budget = compute if compute is not None else dense + attention
    opt_n, opt_d = chinchilla_optimal(budget)
    memory = {"train_replicated": TRAIN_BYTES_PER_PARAM * n, "train_sharded": TRAIN_BYTES_PER_PARAM * n / gpus,
              "inference_weights_bf16": INFERENCE_BYTES_PER_PARAM * n}

    if hardware.strip().lower() == "all":
        chips = [a for a in ACCELERATORS.values() if a.peak_tflops(precision) is not None]
    else:
        chips = [accelerator(hardware)]
        if chips[0].peak_tflops(precision) is None:
            raise ConfigError(f"{chips[0].name} has no published {precision} peak; use --precision bf16")
    estimates = []
    for chip in chips:
        peak = chip.peak_tflops(precision)
        assert peak is not None
        seconds = (dense + attention) / (gpus * peak * 1e12 * mfu)
        gpu_hours = seconds * gpus / 3600
        energy = gpu_hours * chip.tdp_watts / 1000 * pue if chip.tdp_watts is not None else None
        estimates.append(HardwareEstimate(
            chip.name, precision, peak, mfu, gpus, pue, seconds, gpu_hours, energy, chip.tdp_watts, chip.memory_gb,
            memory["train_replicated"] <= chip.memory_gb * 1e9, memory["train_sharded"] <= chip.memory_gb * 1e9,
            chip.note))
    context = (seq_len or config.block_size) if config is not None else None
    result = Plan(n, non_embedding, context, float(tokens), dense, attention, budget, opt_n, opt_d, memory, estimates,
                  config.to_dict() if config is not None else None)
    d = result.to_dict()
    numbers = [*d.values(), *d["memory_bytes"].values(), *(v for e in d["estimates"] for v in e.values())]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):  # the estimates too: "inf years"
        raise ConfigError("the plan overflows a float (inf); give smaller --params / --tokens / --compute / --pue, "
                          "or a larger --mfu")
    return result
