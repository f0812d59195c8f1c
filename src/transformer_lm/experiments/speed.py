"""Parallel processing against recurrence: training tokens/s and forward latency of a Transformer and of an LSTM and
an RNN of matched size, as the sequence grows (`tlm experiment speed`).

A Transformer layer handles all T positions at once: matrix products over the whole sequence, plus attention, whose
work grows as T² but whose sequential depth does not grow at all. A recurrent layer takes T steps one after another,
each a small product with its recurrent matrix that has to wait for the step before (Vaswani et al. 2017, §4 and
Table 1: O(1) against O(n) sequential operations per layer). Which wins on a given machine is what this measures.

Models are sized by non-embedding parameters (`accounting.match_params`); each measurement is timed in rounds that
visit every architecture in turn, so that a machine whose speed drifts (other processes, clocks) affects all alike,
and the median round is reported.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..accounting import count_params, match_params
from ..config import ModelConfig, TrainConfig, check_types, check_unique
from ..errors import ConfigError
from ..model import build_model
from ..optim import make_optimizer
from ..perf import now
from ..runtime import autocast, autocast_dtype, environment, resolve_device
from .plotting import figure, save_png

ARCHS = ("transformer", "lstm", "rnn")
SEQ_LENS = (64, 128, 256, 512, 1024, 2048)


@dataclass
class SpeedConfig:
    """What `tlm experiment speed` measures."""

    preset: str = "tiny"
    """The Transformer, as a model preset; the LSTM and RNN get the width that matches its non-embedding parameters."""
    n_layer: int | None = None
    """Override the preset's number of layers (all architectures get it)."""
    n_embd: int | None = None
    """Override the preset's Transformer width (must stay divisible by its n_head)."""
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    """Architectures to measure: transformer, lstm, rnn."""
    seq_lens: list[int] = field(default_factory=lambda: list(SEQ_LENS))
    """Sequence lengths T to measure at; the longest cost the most (the Transformer's attention grows as T², the
    recurrent models' steps as T)."""
    tokens_per_batch: int = 4096
    """Tokens per training step: each step trains on tokens_per_batch // T sequences (at least 1)."""
    repeats: int = 3
    """Timed rounds per measurement, after one warm-up round; the median round is reported."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    seed: int = 0
    """Seed of the weights and the random tokens."""

    def __post_init__(self) -> None:
        check_types(self, "speed")  # finite numbers, a seed torch takes
        if not self.archs:  # it said "unknown architecture(s) []"
            raise ConfigError(f"archs is empty; name at least one of {', '.join(ARCHS)}")
        unknown = sorted(set(self.archs) - set(ARCHS))
        if unknown:
            raise ConfigError(f"unknown architecture(s) {unknown}; choose among {', '.join(ARCHS)}")
        check_unique("archs", self.archs)
        check_unique("seq_lens", self.seq_lens)
        if self.repeats < 1 or self.tokens_per_batch < 1 or not self.seq_lens or min(self.seq_lens) < 1:
            raise ConfigError("the speed experiment needs repeats >= 1, tokens_per_batch >= 1 and sequence "
                              "lengths >= 1")

    def model_configs(self) -> dict[str, ModelConfig]:
        """The Transformer (context widened to the longest sequence) and recurrent models of matched size."""
        overrides = {k: v for k, v in (("n_layer", self.n_layer), ("n_embd", self.n_embd)) if v is not None}
        transformer = ModelConfig.from_preset(self.preset, **overrides, arch="transformer",
                                              block_size=max(self.seq_lens))
        return {a: transformer if a == "transformer" else match_params(transformer, a) for a in self.archs}


@dataclass
class SpeedRow:
    arch: str
    seq_len: int
    batch_size: int
    """Sequences per training step (tokens_per_batch // seq_len, at least 1)."""
    params: int
    non_embedding_params: int
    n_layer: int
    n_embd: int
    train_tokens_per_s: float
    """Tokens per second of whole training steps: forward, backward, clipping and the AdamW update."""
    forward_ms: float
    """Latency of one forward pass over one sequence of seq_len tokens (batch 1, no gradients)."""


def measure(configs: dict[str, ModelConfig], seq_lens: Sequence[int] = SEQ_LENS, tokens_per_batch: int = 4096,
            repeats: int = 3, device: str = "auto", seed: int = 0,
            on_row: Callable[[SpeedRow], None] | None = None) -> list[SpeedRow]:
    """Time training steps (batch tokens_per_batch // T) and batch-1 forwards at each sequence length T: one warm-up
    round, then `repeats` timed rounds, each visiting every architecture; the median per (architecture, T)."""
    dev = resolve_device(device)
    ctx = autocast(dev, autocast_dtype(dev, "auto"))  # as the trainer: bf16 on GPUs that have it, fp32 on CPU
    gen = torch.Generator().manual_seed(seed)
    models = {a: build_model(c).to(dev).init_weights(seed) for a, c in configs.items()}
    optimizers = {a: make_optimizer(m, TrainConfig(), dev) for a, m in models.items()}
    too_long = [T for T in seq_lens for c in configs.values() if c.arch == "transformer" and T > c.block_size]
    if too_long:
        raise ConfigError(f"sequence length {too_long[0]} exceeds the Transformer's context; widen model.block_size")
    rows = []
    for T in seq_lens:
        B = max(1, tokens_per_batch // T)
        vocab = min(c.vocab_size for c in configs.values())
        x = torch.randint(0, vocab, (B, T + 1), generator=gen).to(dev)
        one = x[:1, :T]
        train_s: dict[str, list[float]] = {a: [] for a in models}
        forward_s: dict[str, list[float]] = {a: [] for a in models}
        for r in range(repeats + 1):  # round 0 warms up (allocator, kernels, caches)
            for a, model in models.items():
                t = _train_step(model, optimizers[a], x, ctx, dev)
                f = _forward(model, one, ctx, dev)
                if r:
                    train_s[a].append(t)
                    forward_s[a].append(f)
        for a, c in configs.items():
            p = count_params(c)
            row = SpeedRow(a, T, B, p.total, p.non_embedding, c.n_layer, c.n_embd,
                           B * T / statistics.median(train_s[a]), 1e3 * statistics.median(forward_s[a]))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _train_step(model: torch.nn.Module, optimizer: Any, x: torch.Tensor, ctx: Any, device: torch.device) -> float:
    model.train()
    start = now(device)
    with ctx:
        loss = model(x[:, :-1], x[:, 1:]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return now(device) - start


@torch.no_grad()
def _forward(model: torch.nn.Module, idx: torch.Tensor, ctx: Any, device: torch.device) -> float:
    model.eval()
    start = now(device)
    with ctx:
        model(idx)
    return now(device) - start


def run_speed(cfg: SpeedConfig, out: str | Path, on_row: Callable[[SpeedRow], None] | None = None
              ) -> tuple[list[SpeedRow], dict[str, Path]]:
    """Measure (see `measure`) and write speed.csv, speed.json and speed.png into `out`; -> the rows and files."""
    Path(out).mkdir(parents=True, exist_ok=True)  # before measuring: an --out the system refuses fails at once
    configs = cfg.model_configs()
    rows = measure(configs, cfg.seq_lens, cfg.tokens_per_batch, cfg.repeats, cfg.device, cfg.seed, on_row)
    settings = {**asdict(cfg), "models": {a: c.to_dict() for a, c in configs.items()},
                "resolved_device": str(resolve_device(cfg.device)), "threads": torch.get_num_threads()}
    return rows, write_results(rows, Path(out), settings)


def write_results(rows: Sequence[SpeedRow], out: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """speed.csv (one row per architecture and length), speed.json (rows, settings, environment) and speed.png."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "speed.csv", "json": out / "speed.json", "png": out / "speed.png"}
    names = list(SpeedRow.__dataclass_fields__)
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(r).items()})
    files["json"].write_text(json.dumps({"experiment": "speed", "settings": settings,
                                         "environment": environment(), "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, files["png"])
    return files


def plot(rows: Sequence[SpeedRow], path: Path) -> Path:
    """Training tokens/s and forward latency against sequence length, log-log, one line per architecture."""
    fig = figure(10.0, 3.8)
    panels = (("train_tokens_per_s", "training tokens/s"), ("forward_ms", "forward latency, batch 1 (ms)"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for arch in dict.fromkeys(r.arch for r in rows):
            mine = [r for r in rows if r.arch == arch]
            ax.plot([r.seq_len for r in mine], [getattr(r, key) for r in mine], "o-",
                    label=f"{arch} ({mine[0].non_embedding_params / 1e6:.2f}M)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_png(fig, path)


def render_table(rows: Sequence[SpeedRow]) -> str:
    """One line per sequence length: each architecture's training tokens/s and forward ms, and the Transformer's
    speed-up over each recurrent model (its tokens/s ÷ theirs; their latency ÷ its)."""
    archs = list(dict.fromkeys(r.arch for r in rows))
    by = {(r.arch, r.seq_len): r for r in rows}
    others = [a for a in archs if a != "transformer"] if "transformer" in archs else []
    head = f"{'T':>6}" + "".join(f"{a + ' tok/s':>18}" for a in archs) + "".join(f"{a + ' ms':>15}" for a in archs)
    head += "".join(f"{'× vs ' + a:>16}" for a in others)
    lines = ["training tokens/s (whole steps) and batch-1 forward latency; × = Transformer speed-up, train / forward",
             head]
    for T in dict.fromkeys(r.seq_len for r in rows):
        line = f"{T:>6}" + "".join(f"{by[a, T].train_tokens_per_s:>18,.0f}" for a in archs)
        line += "".join(f"{by[a, T].forward_ms:>15.2f}" for a in archs)
        for a in others:
            tr = by["transformer", T].train_tokens_per_s / by[a, T].train_tokens_per_s
            fw = by[a, T].forward_ms / by["transformer", T].forward_ms
            line += f"{f'{tr:.2f} / {fw:.2f}':>16}"
        lines.append(line)
    sizes = {a: next(r for r in rows if r.arch == a) for a in archs}
    lines.append("models: " + ", ".join(f"{a} {s.n_layer}×{s.n_embd} ({s.non_embedding_params:,} non-embedding "
                                         f"parameters)" for a, s in sizes.items()))
    return "\n".join(lines)
