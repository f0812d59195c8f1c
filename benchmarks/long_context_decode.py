"""Compiled decode tokens/s at batch 1 against the size of the static KV cache, on the gpt2 preset's shape (random
weights): a step reads every slot (masked), so it slows with the cache's size, but it must not rewrite the cache.

    python benchmarks/long_context_decode.py [--slots 64 1024] [--tokens 16] [--threads N]

Each cache size is measured twice, alternating, after a 16-token prefill and three warm-up steps (the first compiles).
"""

from __future__ import annotations

import argparse
import time

import torch

from transformer_lm.config import ModelConfig, preset
from transformer_lm.decode import StaticKVCache, decode_step, prefill
from transformer_lm.layout import decode_layout
from transformer_lm.model import Transformer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig(**{**preset("gpt2"), "dropout": 0.0})
    model = decode_layout(Transformer(config).init_weights(seed=0).eval())
    step = decode_step(compile=True)
    tok = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for slots in args.slots * 2:
            cache = StaticKVCache(config, 1, slots)
            prefill(model, cache, torch.randint(config.vocab_size, (1, 16)))
            for _ in range(3):
                step(model, cache, tok, None, None)
            start = time.perf_counter()
            for _ in range(args.tokens):
                step(model, cache, tok, None, None)
            print(f"{slots:>6} slots: {args.tokens / (time.perf_counter() - start):6.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
