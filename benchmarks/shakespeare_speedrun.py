"""Time to val loss 1.88 on Tiny Shakespeare (char-level), speedrun-style, against nanoGPT's CPU recipe in the same run.

Both runs train with `tlm`'s trainer on the same prepared data (90/10 split, context 64) and are scored by the loss over
the whole validation split. The clock is the training steps' time (`TrainResult.elapsed`): evaluation, data
preparation and a short warm-up run (allocator, kernel selection, compile when the recipe compiles) stay outside it,
as speedruns measure. Prints both runs' time and val loss and the ratio (target: the preset in at most a third of the
recipe's time, at val loss <= 1.88).

    python benchmarks/shakespeare_speedrun.py [../shared/data/tinyshakespeare/input.txt] [--preset shakespeare-speedrun]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from transformer_lm.config import ModelConfig, TrainConfig, preset, preset_recipe
from transformer_lm.data import is_prepared, load_prepared, prepare, read_sources, resolve_sources
from transformer_lm.tokenizers import build_tokenizer
from transformer_lm.train import train

# nanoGPT config/train_shakespeare_char.py with its README's CPU overrides
NANOGPT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
NANOGPT_TRAIN = dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr_ratio=0.1, warmup_iters=100, beta2=0.99,
                     weight_decay=0.1, grad_clip=1.0)
EVAL = dict(eval_interval=10**9, eval_batches=10**6, log_interval=50)  # one evaluation, at the end: the whole split


def run(name: str, model: dict, recipe: dict, data, out: Path) -> tuple[float, float]:
    mc, tc = ModelConfig(**model), TrainConfig(**{**recipe, **EVAL})
    train(mc, TrainConfig(**{**recipe, **EVAL, "max_iters": 5, "max_time": None, "max_tokens": None,
                             "eval_batches": 1}), data,
          out / f"{name}-warmup", overwrite=True, progress=False)  # warm-up, off the clock
    res = train(mc, tc, data, out / name, overwrite=True, progress=False)
    print(f"{name:>24}: {res.step} steps, {res.elapsed:6.1f} s of training, val loss {res.val.loss:.4f}", flush=True)
    return res.elapsed, res.val.loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", nargs="?", default="../shared/data/tinyshakespeare/input.txt")
    ap.add_argument("--preset", default="shakespeare-speedrun")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "tlm-speedrun"))
    args = ap.parse_args()
    out = Path(args.out)
    data_dir = out / "data"
    if not is_prepared(data_dir):
        sources = resolve_sources(args.input)
        prepare(sources, data_dir, build_tokenizer("char", read_sources(sources)))
    data = load_prepared(data_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    base_t, base_loss = run("nanogpt-cpu-recipe", NANOGPT_MODEL, NANOGPT_TRAIN, data, out)
    fast_t, fast_loss = run(args.preset, preset(args.preset), preset_recipe(args.preset), data, out)
    print(f"speed-up {base_t / fast_t:.2f}x (target >= 3x); val loss {fast_loss:.4f} (target <= 1.88) -> "
          f"{'PASS' if base_t / fast_t >= 3 and fast_loss <= 1.88 else 'FAIL'}")


if __name__ == "__main__":
    main()
