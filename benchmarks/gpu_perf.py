"""GPU performance check, one short run: training MFU of the 124M model in bf16 with torch.compile, decode MBU at
batch 1 (static KV cache, compiled decode step with CUDA graphs), and GPU-vs-CPU greedy agreement.

Training uses the trainer's own pieces (`parallelize` for compile, `make_optimizer` for fused AdamW, `autocast`),
on random tokens (throughput does not depend on the data). MFU = training FLOPs per token (`accounting`, 6N plus
attention) × tokens/s ÷ the datasheet bf16 peak of the GPU (`perf`). MBU = bytes one decode step reads (weights + KV
cache) × tokens/s ÷ the copy bandwidth measured now. Targets on an H200: MFU >= 55%, MBU >= 85%.

A lent GPU comes for minutes, so the rows run in order of importance and each is timed: the three that answer the
targets first (train at `--batch`, decode of `--preset` in fp32 with the CPU comparison, decode of `--big_preset` in
bf16: at 124M a decode step is a few hundred tiny kernels, so MBU is also read where the weights, not the launches,
take the time), then diagnostics for whatever falls short, each run only where it would end within `--budget_s`
(taken to last as long as the longest row so far: most of a row is compiling): twice the batch, the loss as plain
logits + cross-entropy instead of the fused head + loss (loss.py has only been measured on a CPU), the vocabulary
padded to a multiple of 64 (GPT-2's 50,257 is odd; nanoGPT pads to 50,304 for the GEMMs), and decode of `--preset`
in bf16. A row that fails is recorded with its error and the next one runs. `--json` is rewritten after every row,
so a run stopped from outside keeps the rows it finished.

    python benchmarks/gpu_perf.py --json out.json    # on the GPU: gpt2 shape, batch 16 x 1024, llama-2-7b decode
    python benchmarks/gpu_perf.py --device cpu --preset tiny --big_preset tiny --batch 2 --steps 2 --new_tokens 8
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from transformer_lm.accounting import flops_per_token
from transformer_lm.config import ModelConfig, TrainConfig, preset
from transformer_lm.decode import DecodeStats, release_cache
from transformer_lm.generate import generate
from transformer_lm.model import Transformer
from transformer_lm.optim import make_optimizer
from transformer_lm.parallel import DistInfo, parallelize
from transformer_lm.perf import copy_bandwidth, decode_mbu, mfu, now, peak_flops
from transformer_lm.runtime import autocast

PROMPT = list(range(1, 17))
"""Prompt ids of every decode row."""


def build(config: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> Transformer:
    """A randomly initialized model made directly on `device` (a 7B model never passes through host memory)."""
    with device:
        model = Transformer(config).init_weights(0)
    return model.to(dtype)


def _free(device: torch.device) -> None:
    """Forget compiled graphs and cached blocks between rows, so each row starts from the same state."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def train_mfu(config: ModelConfig, device: torch.device, batch: int, steps: int, compile: bool,
              loss: str = "fused") -> dict:
    """Tokens/s and MFU of optimizer steps at batch × block_size. `loss`: "fused" is the trainer's (the model called
    with targets: head and loss together, loss.py); "plain" builds the logits and calls F.cross_entropy on them,
    compiled with the model."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TrainConfig(compile=compile, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    model = build(config, device)
    if loss == "fused":
        forward = parallelize(model, DistInfo(), cfg)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return forward(x, x).loss
    else:
        def plain(x: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x).logits.flatten(0, 1).float(), x.flatten())

        loss_of = torch.compile(plain) if compile else plain
    optimizer = make_optimizer(model, cfg, device)
    x = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)

    def step() -> None:
        with autocast(device, dtype):
            value = loss_of(x)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compile and allocator warm-up, off the clock
        step()
    start = now(device)
    for _ in range(steps):
        step()
    seconds = (now(device) - start) / steps
    tokens_per_s = batch * config.block_size / seconds
    peak = peak_flops(device, dtype)
    return {"step_s": seconds, "tokens_per_s": tokens_per_s, "peak_tflops": peak / 1e12,
            "mfu": mfu(flops_per_token(config)["train"], tokens_per_s, peak), "peak_memory_gb": _peak_gb(device)}


def decode(config: ModelConfig, device: torch.device, new_tokens: int, compile: bool,
           dtype: torch.dtype = torch.float32, compare_cpu: bool = False) -> dict:
    """Greedy batch-1 decoding after a 16-token prompt: tokens/s of the decode steps and MBU; with `compare_cpu`, also
    whether the first (up to 32) ids equal those of the same weights decoded on the CPU in fp32."""
    if compare_cpu:
        cpu = Transformer(config).init_weights(0).eval()
        reference = list(generate(cpu, PROMPT, min(32, new_tokens), temperature=0.0))
        model = cpu.to(device=device, dtype=dtype)  # the same weights
    else:
        model = build(config, device, dtype).eval()
    list(generate(model, PROMPT, new_tokens, temperature=0.0, compile=compile))  # compile / graph capture warm-up
    stats = DecodeStats()
    ids = list(generate(model, PROMPT, new_tokens, temperature=0.0, compile=compile, stats=stats))
    context = len(PROMPT) + new_tokens // 2  # the mean cached length over the generation
    # the weights' device (cuda:0), as decode_mbu measures it: copy_bandwidth is cached per device, and "cuda" is
    # another key, so the bandwidth printed would be a second measurement, not the one the MBU divides by
    bandwidth = copy_bandwidth(next(model.parameters()).device)
    result = {"tokens_per_s": stats.decode_tokens_per_s, "bandwidth_gb_s": bandwidth / 1e9,
              "mbu": decode_mbu(model, stats.decode_tokens_per_s, context), "peak_memory_gb": _peak_gb(device)}
    if compare_cpu:
        got = ids[:len(reference)]
        mismatch = next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), None)
        result.update(greedy_equal_to_cpu=got == reference, first_mismatch=mismatch)
    release_cache(model)
    return result


def padded(config: ModelConfig, multiple: int = 64) -> ModelConfig:
    """`config` with its vocabulary rounded up to a multiple of `multiple` (extra rows: never a target)."""
    return ModelConfig(**{**config.to_dict(), "vocab_size": math.ceil(config.vocab_size / multiple) * multiple})


def fits(elapsed: float, longest: float, budget: float) -> bool:
    """Whether a diagnostic row started `elapsed` seconds in ends within `budget`, taken to last `longest` (the
    longest row so far): a row allowed to start whenever the budget had not yet passed could end a whole row of
    compiling (a minute or more on a GPU) past it, and the run past the time it was given."""
    return elapsed + longest <= budget


def describe(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name}: FAILED {r['error']}"
    mem = f", peak {r['peak_memory_gb']:.1f} GB" if r.get("peak_memory_gb") is not None else ""
    if "mfu" in r:
        return (f"{name}: {r['tokens_per_s']:,.0f} tok/s, {r['step_s'] * 1e3:.1f} ms/step, MFU {r['mfu']:.1%} "
                f"(peak {r['peak_tflops']:.1f} TFLOP/s; target >= 55%){mem}")
    line = (f"{name}: {r['tokens_per_s']:,.1f} tok/s, MBU {r['mbu']:.1%} of {r['bandwidth_gb_s']:,.0f} GB/s "
            f"measured (target >= 85%){mem}")
    if "greedy_equal_to_cpu" in r:
        line += f"; greedy equal to CPU: {r['greedy_equal_to_cpu']} (first mismatch {r['first_mismatch']})"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2", help="the trained and first decoded shape")
    ap.add_argument("--big_preset", default="llama-2-7b", help="decoded in bf16 where bandwidth binds; none: skip")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--budget_s", type=float, default=420.0,
                    help="seconds by which every diagnostic row must have ended (see fits)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    compile = bool(args.compile)
    config = ModelConfig(**{**preset(args.preset), "dropout": 0.0})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with torch.device("meta"):  # counted without allocating the weights
        params = Transformer(config).num_params()
    print(f"{args.preset} ({params / 1e6:.1f}M) on {name}, torch {torch.__version__}", flush=True)

    def train_row(batch: int, loss: str = "fused", cfg: ModelConfig = config) -> Callable[[], dict]:
        return lambda: train_mfu(cfg, device, batch, args.steps, compile, loss)

    def decode_row(cfg: ModelConfig, dtype: torch.dtype, compare_cpu: bool = False) -> Callable[[], dict]:
        return lambda: decode(cfg, device, args.new_tokens, compile, dtype, compare_cpu)

    amp = "bf16" if device.type == "cuda" else "fp32"  # the training rows' autocast (train_mfu)
    targets = [(f"train {args.preset} {amp} {args.batch}x{config.block_size}", train_row(args.batch)),
               (f"decode batch 1 {args.preset} fp32", decode_row(config, torch.float32, compare_cpu=True))]
    if args.big_preset != "none":
        big = ModelConfig(**{**preset(args.big_preset), "dropout": 0.0})
        targets.append((f"decode batch 1 {args.big_preset} bf16", decode_row(big, torch.bfloat16)))
    diagnostics = [(f"train {args.preset} {amp} {2 * args.batch}x{config.block_size}", train_row(2 * args.batch)),
                   (f"train {args.preset} {amp} {args.batch}x{config.block_size}, plain loss",
                    train_row(args.batch, "plain")),
                   (f"train {args.preset} {amp} {args.batch}x{config.block_size}, vocab {padded(config).vocab_size}",
                    train_row(args.batch, cfg=padded(config))),
                   (f"decode batch 1 {args.preset} bf16", decode_row(config, torch.bfloat16))]
    start = time.perf_counter()
    results = {}
    longest = 0.0
    for i, (row, run) in enumerate(targets + diagnostics):
        if i >= len(targets) and not fits(time.perf_counter() - start, longest, args.budget_s):
            print(f"{row}: skipped (would end past --budget_s {args.budget_s:.0f})", flush=True)
            continue
        _free(device)
        began = time.perf_counter()
        try:
            results[row] = run()
        except Exception as e:  # noqa: BLE001 - a failed row is a result to report, and the next row still runs
            results[row] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        results[row]["row_s"] = time.perf_counter() - began
        longest = max(longest, results[row]["row_s"])
        print(f"{describe(row, results[row])} [{results[row]['row_s']:.0f} s]", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": args.preset, "device": name, "torch": torch.__version__, "rows": results}, f,
                          indent=2)


if __name__ == "__main__":
    main()
