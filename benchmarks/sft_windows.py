"""Supervised fine-tuning's training windows: begun where conversations begin, the ones packed after kept apart
(what `tlm train chats.jsonl` does), against begun anywhere and not kept apart (uniform random starts, as on text),
the same model, data, seed and steps, in one run.

    python benchmarks/sft_windows.py                              # ~2 min on 2 CPU cores
    python benchmarks/sft_windows.py --pos_encoding learned --steps 600 --block 96

The task needs the question: each conversation gives a random word of 3-12 letters and the reply is that word in
capitals ("u: kqzfbw" -> "a: KQZFBW"), in a two-line chat template, byte tokenizer. A window that begins inside a
conversation trains its reply without (all of) the word it copies: noise the aligned windows do not have. Both arms
are a fresh `tiny`-shaped model (4 layers, 128 wide, RoPE by default) trained from the same initialisation on the
same prepared data (1,800 conversations, 200 held out) with the same schedule; they differ only in BatchSampler's
`starts` (which also give the packed conversations their own positions and attention: BatchSampler.layout).
Reported: the held-out replies' loss (each conversation scored on its own from its first token, as `tlm eval`
scores them) and the share of held-out words answered exactly by greedy decoding (Run.chat), for each arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import string
import tempfile
import time
from pathlib import Path

from transformer_lm.api import load_run
from transformer_lm.chat_data import prepare_chats
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.data import load_prepared
from transformer_lm.tokenizers import ByteTokenizer
from transformer_lm.train import read_metrics, train

TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}a: {% endif %}")


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))) for _ in range(n)]
    return [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]} for w in words]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pos_encoding", default="rope", choices=["learned", "rope", "sinusoidal"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chats = conversations(2000, args.seed)
        (tmp / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
        prepare_chats([tmp / "chats.jsonl"], tmp / "data", ByteTokenizer(), TEMPLATE, val_fraction=0.1)
        data = load_prepared(tmp / "data")
        model = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=args.block,
                            vocab_size=data.tokenizer.vocab_size, pos_encoding=args.pos_encoding)
        cfg = TrainConfig(batch_size=args.batch, max_iters=args.steps, eval_interval=args.steps, eval_batches=1000,
                          log_interval=args.steps, warmup_iters=args.steps // 10, lr=3e-3, seed=args.seed)
        held_out = [c["messages"] for c in chats[-200:]]
        print(f"{len(chats)} conversations ({data.manifest['train_tokens']} train tokens), block {args.block}, "
              f"batch {args.batch}, {args.steps} steps, {args.pos_encoding} positions")
        print(f"{'windows begin':<26} {'reply loss':>10} {'exact':>9} {'train s':>8}")
        for name, arm in (("where conversations do", data), ("anywhere", dataclasses.replace(data, train_starts=None))):
            out = tmp / name.replace(" ", "-")
            t0 = time.perf_counter()
            train(model, cfg, arm, out, progress=False)
            seconds = time.perf_counter() - t0
            val = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r][-1]
            run = load_run(out, "cpu")
            right = sum(run.chat(m[:1], greedy=True, max_new_tokens=16, stop=["\n"]).strip() == m[1]["content"]
                        for m in held_out)
            print(f"{name:<26} {val['val_loss']:>10.4f} {right / len(held_out):>8.1%} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
