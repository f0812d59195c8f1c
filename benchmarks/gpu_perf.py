"""GPU performance check, one short run: training MFU of the 124M model in bf16 with torch.compile, decode MBU at
batch 1 (static KV cache, compiled decode step), and GPU-vs-CPU greedy agreement.

Training uses the trainer's own pieces (`parallelize` for compile, `make_optimizer` for fused AdamW, `autocast`),
on random tokens (throughput does not depend on the data). MFU = training FLOPs per token (`accounting`, 6N plus
attention) × tokens/s ÷ the datasheet bf16 peak of the GPU (`perf`). MBU = bytes one decode step reads (weights + KV
cache) × tokens/s ÷ the copy bandwidth measured now. Targets on an H200: MFU >= 55%, MBU >= 85%.

    python benchmarks/gpu_perf.py                    # on the GPU: gpt2 shape, batch 16 x 1024
    python benchmarks/gpu_perf.py --device cpu --preset tiny --batch 4 --steps 3 --new_tokens 16   # smoke test
"""

from __future__ import annotations

import argparse
import json

import torch

from transformer_lm.accounting import flops_per_token
from transformer_lm.config import ModelConfig, TrainConfig, preset
from transformer_lm.decode import DecodeStats
from transformer_lm.generate import generate
from transformer_lm.model import Transformer
from transformer_lm.optim import make_optimizer
from transformer_lm.parallel import DistInfo, parallelize
from transformer_lm.perf import copy_bandwidth, decode_mbu, mfu, now, peak_flops
from transformer_lm.runtime import autocast


def train_mfu(config: ModelConfig, device: torch.device, batch: int, steps: int, compile: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TrainConfig(compile=compile, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    model = Transformer(config).to(device).init_weights(0)
    forward = parallelize(model, DistInfo(), cfg)
    optimizer = make_optimizer(model, cfg, device)
    x = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)

    def step() -> None:
        with autocast(device, dtype):
            loss = forward(x, x).loss
        loss.backward()
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
            "mfu": mfu(flops_per_token(config)["train"], tokens_per_s, peak)}


def decode(config: ModelConfig, device: torch.device, new_tokens: int, compile: bool) -> dict:
    model = Transformer(config).init_weights(0).eval()
    prompt = list(range(1, 17))
    cpu_ids = list(generate(model, prompt, 32, temperature=0.0))  # greedy reference on the CPU, fp32
    model = model.to(device)
    list(generate(model, prompt, new_tokens, temperature=0.0, compile=compile))  # compile warm-up
    stats = DecodeStats()
    ids = list(generate(model, prompt, new_tokens, temperature=0.0, compile=compile, stats=stats))
    context = len(prompt) + new_tokens // 2  # the mean cached length over the generation
    return {"tokens_per_s": stats.decode_tokens_per_s, "bandwidth_gb_s": copy_bandwidth(device) / 1e9,
            "mbu": decode_mbu(model, stats.decode_tokens_per_s, context),
            "greedy_equal_to_cpu_first_32": ids[:32] == cpu_ids[:len(ids[:32])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    config = ModelConfig(**{**preset(args.preset), "dropout": 0.0})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.preset} ({sum(p.numel() for p in Transformer(config).parameters()) / 1e6:.1f}M) on {name}, "
          f"torch {torch.__version__}", flush=True)
    train = train_mfu(config, device, args.batch, args.steps, bool(args.compile))
    print(f"train  {args.batch}x{config.block_size}: {train['tokens_per_s']:,.0f} tok/s, MFU {train['mfu']:.1%} "
          f"(peak {train['peak_tflops']:.1f} TFLOP/s; target >= 55% on H100/H200)", flush=True)
    dec = decode(config, device, args.new_tokens, bool(args.compile))
    print(f"decode batch 1: {dec['tokens_per_s']:,.0f} tok/s, MBU {dec['mbu']:.1%} of "
          f"{dec['bandwidth_gb_s']:,.0f} GB/s measured (target >= 85%); greedy equal to CPU: "
          f"{dec['greedy_equal_to_cpu_first_32']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "device": name, "train": train, "decode": dec}, f, indent=2)


if __name__ == "__main__":
    main()
