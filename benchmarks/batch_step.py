"""What one batched decode step costs by rows, the figures behind batching.py's and layout.py's choices: a step of
B rows (RowKVCache + decode_one_token, as the batching server runs it) in nn.Linear's layout, the decode layout
(weights stored [in, out]) and, where fbgemm is there, w8a8; then a whole greedy generate() from the main thread and
from another one (OpenMP's regions run slower off the main thread on some CPUs: why `tlm serve` drives its batch from
the main thread).

    python benchmarks/batch_step.py RUN [--rows 1 2 4 8] [--threads N]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from transformer_lm.api import load_run
from transformer_lm.batching import RowKVCache
from transformer_lm.decode import activation_dtype, decode_one_token
from transformer_lm.generate import generate
from transformer_lm.quantize import _dynamic_kernels, parse_quantize


def step_ms(model: torch.nn.Module, rows: int, filled: int = 40, repeats: int = 10) -> float:
    """Median ms of one decode step of `rows` rows at `filled` cached positions."""
    cache = RowKVCache(model.config, rows, 128, torch.device("cpu"), activation_dtype(model))
    cache.visible = filled + 1
    tok, pos = torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), filled)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            cache.pos.fill_(filled)
            t0 = time.perf_counter()
            decode_one_token(model, cache, tok, pos, None)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts = {"nn.Linear": load_run(args.run, "cpu"), "decode layout": load_run(args.run, "cpu").use_decode_layout()}
    if _dynamic_kernels():
        layouts["w8a8"] = load_run(args.run, "cpu").quantize(**parse_quantize("w8a8"))
    print(f"{args.run}: one decode step, ms (tokens/s), {torch.get_num_threads()} threads")
    for name, run in layouts.items():
        cells = [f"{r} rows {ms:.1f} ({r / ms * 1e3:.0f})" for r in args.rows for ms in [step_ms(run.model, r)]]
        print(f"{name:>14}: " + ", ".join(cells))

    model = layouts["nn.Linear"].model

    def tokens_per_s() -> float:
        t0 = time.perf_counter()
        list(generate(model, [1, 2, 3], 128, temperature=0))
        return 128 / (time.perf_counter() - t0)

    for _ in range(2):
        other: list[float] = []
        thread = threading.Thread(target=lambda out=other: out.append(tokens_per_s()))
        thread.start()
        thread.join()
        print(f"generate(), 128 greedy tokens: main thread {tokens_per_s():.0f} tokens/s, another thread "
              f"{other[0]:.0f}")


if __name__ == "__main__":
    main()
