"""The fused LM head + loss (loss.py) against the plain path it replaced, in whole training steps of our model.

    python benchmarks/fused_loss.py                          # GPT-2 124M, 1 × 1024, 16 rounds, + peak memory at 1 and 4
    python benchmarks/fused_loss.py --preset tiny --batch 16 --seq 256 --rounds 8 --peak_batches

Plain: `model(x).logits` (gradients on, no targets: the logits are built) and F.cross_entropy on them, as the model
computed its loss before. Fused: `model(x, y).loss`. Everything else in the step is the same: backward, clip to 1.0,
fused-where-available AdamW, zero_grad. Time: `--rounds` rounds in one process, each one step of both, the order
alternating (A B, B A, ...); reported per variant are the medians of wall time, process CPU time and minor page faults,
and the median of the per-round ratios plain / fused. Peak memory: each variant in its own process (the peak resident
set only grows), two steps, per batch size in `--peak_batches`. Random weights and tokens; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from transformer_lm.config import ModelConfig, preset
from transformer_lm.model import Transformer
from transformer_lm.optim import fused_adamw


def build(name: str, batch: int, seq: int | None) -> tuple[Transformer, torch.optim.Optimizer, torch.Tensor]:
    config = ModelConfig(**{**preset(name), "dropout": 0.0})
    model = Transformer(config).init_weights(seed=0).train()
    fused = fused_adamw(torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused, foreach=not fused)
    tokens = torch.randint(0, config.vocab_size, (batch, (seq or config.block_size) + 1),
                           generator=torch.Generator().manual_seed(0))
    return model, opt, tokens


def step(model: Transformer, opt: torch.optim.Optimizer, tokens: torch.Tensor, fused: bool) -> tuple[float, float, int]:
    """One training step -> (wall s, process CPU s, minor page faults)."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    faults, cpu, wall = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
    if fused:
        loss = model(x, y).loss
    else:
        logits = model(x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - wall, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def timed(args: argparse.Namespace) -> dict:
    model, opt, tokens = build(args.preset, args.batch, args.seq)
    for fused in (False, True):  # warm-up: allocator, oneDNN primitives, AdamW state
        step(model, opt, tokens, fused)
    runs: dict[str, list[tuple[float, float, int]]] = {"plain": [], "fused": []}
    for r in range(args.rounds):
        for name in (("plain", "fused") if r % 2 == 0 else ("fused", "plain")):
            runs[name].append(step(model, opt, tokens, name == "fused"))
    out = {}
    for i, what in enumerate(("wall_ms", "cpu_ms", "minor_faults")):
        scale = 1e3 if i < 2 else 1
        out[what] = {k: statistics.median(s[i] for s in v) * scale for k, v in runs.items()}
        if i < 2:
            out[what]["plain/fused paired"] = statistics.median(a[i] / b[i] for a, b in
                                                                zip(runs["plain"], runs["fused"], strict=True))
    return out


def peak(args: argparse.Namespace) -> int:
    """Peak resident set (MB) of two steps of one variant; run in a process of its own."""
    model, opt, tokens = build(args.preset, args.batch, args.seq)
    for _ in range(2):
        step(model, opt, tokens, args.peak == "fused")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the block size)")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak_batches", type=int, nargs="*", default=[1, 4],
                   help="batch sizes whose peak memory is measured, each variant in its own process")
    p.add_argument("--peak", choices=["plain", "fused"], help=argparse.SUPPRESS)  # the child process's mode
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        print(peak(args))
        return
    result = {"args": vars(args), "torch": torch.__version__, "time": timed(args), "peak_mb": {}}
    for what, row in result["time"].items():
        cells = (f"{k} {v:,.3f}" if "paired" in k else f"{k} {v:,.0f}" for k, v in row.items())
        print(f"{what:>13}: " + ", ".join(cells))
    for b in args.peak_batches:
        row = {}
        for variant in ("plain", "fused"):
            cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(b), "--threads", str(args.threads),
                   "--peak", variant] + (["--seq", str(args.seq)] if args.seq else [])
            row[variant] = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
        result["peak_mb"][b] = row
        print(f"peak RSS at batch {b}: plain {row['plain']:,} MB, fused {row['fused']:,} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
