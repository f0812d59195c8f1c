"""What a long prompt arriving costs the generations already running in a batch (batching.Batcher, as `tlm serve`
runs it): the longest gap between a running sample's tokens while another's prompt is prefilled, with the prompt
prefilled a chunk per step (`--prefill_chunk`, default 256) and whole (a chunk as long as the prompt).

    python benchmarks/prefill_stall.py RUN [--prompt 1000] [--chunks 64 256 100000] [--threads N]

The running sample is greedy and long; the newcomer's prompt is `--prompt` random ids. Also printed: the newcomer's
time to its first token (its prefill, now spread over the running one's steps).
"""

from __future__ import annotations

import argparse
import time

import torch

from transformer_lm.api import load_run
from transformer_lm.batching import Batcher
from transformer_lm.decode import DecodeStats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 100_000])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.run)
    long = torch.randint(0, run.model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    print(f"{args.run}: a {args.prompt}-token prompt joining a running sample, {torch.get_num_threads()} threads")
    print(f"{'chunk':>7} {'longest gap ms':>14} {'median gap ms':>13} {'newcomer first token s':>22}")
    for chunk in args.chunks:
        batcher = Batcher(run.model, rows=2, prefill_chunk=chunk)
        running = batcher.submit([1, 2, 3], 10**6, temperature=0)
        for _ in range(5):  # under way
            next(running)
        gaps, last = [], time.perf_counter()
        t0 = time.perf_counter()
        arrived = DecodeStats()  # its prompt_tokens are set once its prefill is done
        batcher.submit(long.tolist(), 2, temperature=0, stats=arrived)
        first = None
        while first is None or len(gaps) < 5:
            next(running)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if first is None and arrived.prompt_tokens:
                first = now - t0
        batcher.close()
        gaps.sort()
        print(f"{chunk:>7} {gaps[-1] * 1e3:>14.0f} {gaps[len(gaps) // 2] * 1e3:>13.0f} {first:>22.2f}")


if __name__ == "__main__":
    main()
