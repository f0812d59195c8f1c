"""Decode throughput at batch 1: float32 vs weight-only int8 vs int4 vs w8a8 (CPU), on the gpt2 preset's shape
(random weights), the model prepared as `tlm sample` prepares it (layout.decode_layout, then quantize()).

    python benchmarks/quantized_decode.py [--tokens 64] [--repeats 3] [--threads N] [--compile]

Each variant generates `tokens` greedy tokens after a 16-token prompt, after one warm-up call (which compiles, with
--compile); the variants are timed in turns (round robin, `repeats` rounds) so that a busy machine slows them alike,
and the median round is reported. Also reports greedy agreement with float32 and the weight bytes each variant holds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from transformer_lm.config import ModelConfig, preset
from transformer_lm.generate import generate
from transformer_lm.layout import decode_layout
from transformer_lm.model import Transformer
from transformer_lm.quantize import W8A8Linear, quantize


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights held: parameters and buffers once each, plus the int8 levels w8a8's kernels hold packed
    outside any buffer (a tied head's twice: packed for the product, and as the table the embedding reads)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total + sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, W8A8Linear))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="compile the decode step (as --compile true does)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig(**preset("gpt2"))
    base = decode_layout(Transformer(config).init_weights(seed=0).eval())
    models = {"fp32": base, "int8": quantize(copy.deepcopy(base), 8),
              f"int4 (group {args.group_size})": quantize(copy.deepcopy(base), 4, args.group_size),
              "w8a8": quantize(copy.deepcopy(base), 8, dynamic=True)}
    prompt = torch.randint(0, config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    outputs, times = {}, {name: [] for name in models}
    for name, m in models.items():  # warm-up
        outputs[name] = list(generate(m, prompt, args.tokens, temperature=0.0, compile=args.compile))
    for _ in range(args.repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            list(generate(m, prompt, args.tokens, temperature=0.0, compile=args.compile))
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"gpt2 shape, {base.num_params() / 1e6:.1f}M params, batch 1, prompt 16, {args.tokens} new tokens, "
          f"{torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'}, torch {torch.__version__}")
    print(f"{'variant':<20}{'weights MB':>12}{'tokens/s':>10}{'vs fp32':>9}{'greedy = fp32':>15}")
    for name, m in models.items():
        same = sum(a == b for a, b in zip(outputs[name], outputs["fp32"]))
        tps = args.tokens / median[name]
        print(f"{name:<20}{weight_bytes(m) / 1e6:>12.0f}{tps:>10.1f}{median['fp32'] / median[name]:>8.2f}x"
              f"{same:>9}/{args.tokens}")


if __name__ == "__main__":
    main()
