"""Training memory of a fine-tune step: full, LoRA over float32 weights, and QLoRA over int8 / int4 weights
(train.lora_quantize), each measured in its own process on the CPU, beside what the memory plan (`tlm memory`) says.

    python benchmarks/qlora_memory.py                         # GPT-2 124M shape, batch 1 × 512, rank 8 (~2 min)
    python benchmarks/qlora_memory.py --seq 1024 --steps 2

Each variant builds the model (random weights), swaps in what train.py swaps in (lora.quantize_base, lora.add_lora),
and takes `--steps` AdamW steps over the trained parameters (forward with the loss, backward, step) in float32.
Measured: the process's peak resident memory during those steps (Linux's VmHWM, reset after the model is set up,
so that the float32 weights a QLoRA base is quantized from are not counted), less its resident memory before the
model existed, with glibc's malloc set to return every freed buffer at once (MALLOC); and the median step time. The
plan's peak (plan_memory, float32, the foreach AdamW of a CPU) is printed beside it: it counts tensors, the process
also holds the framework's own buffers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from transformer_lm.config import ModelConfig
from transformer_lm.experiments.memory import plan_memory, quantized_bytes
from transformer_lm.lora import add_lora, lora_params, quantize_base
from transformer_lm.model import Transformer

MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
"""A fixed mmap threshold: every buffer of 128 KiB or more is mapped afresh and unmapped when freed, so that the
resident memory follows the live tensors (glibc's default raises the threshold to a freed buffer's size, after which
buffers of that size stay resident when freed, and the peak then reads an allocator's caching, not a plan's)."""
VARIANTS = {"full": None, "lora": None, "qlora-int8": (8, 128), "qlora-int4": (4, 128)}


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(variant: str, preset: str, seq: int, rank: int, steps: int) -> dict:
    config = ModelConfig.from_preset(preset)
    before = _status("VmRSS")
    torch.manual_seed(0)
    model = Transformer(config).init_weights(0)
    if variant != "full":
        if VARIANTS[variant] is not None:
            quantize_base(model, *VARIANTS[variant])
        add_lora(model, rank, 2.0 * rank)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, foreach=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the float32 weights a base was quantized from go back to the system
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    x = torch.randint(config.vocab_size, (1, seq + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    held = VARIANTS[variant]
    plan = plan_memory(config, 1, seq, dtype="float32", fused_optimizer=False,
                       trained=None if variant == "full" else lora_params(config, rank),
                       base_bytes=None if held is None else quantized_bytes(config, *held))
    return {"variant": variant, "peak": _status("VmHWM") - before, "plan": plan.peak,
            "step_s": statistics.median(times), "trained": sum(p.numel() for p in trained)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(measure(args.variant, args.preset, args.seq, args.rank, args.steps)))
        return
    print(f"{args.preset}, batch 1 × {args.seq}, LoRA rank {args.rank}, float32, {args.steps} steps, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'variant':<12} {'trained':>12} {'peak MB':>9} {'plan MB':>9} {'step s':>7}")
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, *sys.argv[1:]], check=True,
                             capture_output=True, text=True, env={**os.environ, **MALLOC}).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        print(f"{variant:<12} {r['trained']:>12,} {r['peak'] / 1e6:>9,.0f} {r['plan'] / 1e6:>9,.0f} "
              f"{r['step_s']:>7.2f}")
    lora = next(r for r in rows if r["variant"] == "lora")
    for r in rows:
        if r["variant"].startswith("qlora"):
            print(f"{r['variant']}: {lora['peak'] / r['peak']:.2f}x less peak memory than LoRA over float32 weights, "
                  f"{r['step_s'] / lora['step_s']:.2f}x its step time")


if __name__ == "__main__":
    main()
