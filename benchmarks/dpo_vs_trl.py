"""DPO: ours (`tlm train PAIRS --train.init_from RUN`) against TRL's DPOTrainer, same run, same machine (CPU), same
model, pairs and batch: do they compute the same thing, and how fast is a step?

    python benchmarks/dpo_vs_trl.py                     # GPT-2 shape, 4 layers × 256, 8 pairs a step (~2 min)
    pip install -e . trl                                # the peer (with its datasets and accelerate); not a test dep

What is compared. A GPT2LMHeadModel (GPT-2's BPE from ../shared/data/gpt2-bpe, random weights, seed 0) saved as a
Hugging Face folder is the start and reference of both: TRL loads it, `tlm convert` imports it. The pairs: a line of
Tiny Shakespeare as the prompt (ending in a newline, a token boundary, so that TRL's joint tokenization of prompt and
completion and ours, apart, give the same ids), its next line chosen, a random other line rejected, an end-of-text
after each completion (as both add it). Agreement: our DPO-trained model, exported (`tlm export`), is scored by TRL's
evaluate() against the base on held-out pairs, and by ours (`Run.evaluate(pairs, reference=base)`): loss, reward
accuracy and margin must agree to 1e-4, under each loss (sigmoid, hinge, ipo, robust with label smoothing 0.1, and
RPO: sigmoid plus the chosen side's NLL, TRL's loss_type ["sigmoid", "sft"] with weights [1, 1]). Speed: each
trains the same number of steps of the same batch (beta 0.1, AdamW, lr 1e-4, float32, no dropout, `--loss`); a
step's time is the median over the steps after the first (ours: the metrics' clock; TRL's: a callback's, around
its whole training step). Reported: both, and ours/TRL's speed ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_pairs(path: Path, lines: list[str], n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            i = rng.randrange(len(lines) - 1)
            other = rng.choice([j for j in rng.sample(range(len(lines)), 4) if j not in (i, i + 1)])
            f.write(json.dumps({"prompt": lines[i] + "\n", "chosen": lines[i + 1], "rejected": lines[other]}) + "\n")
    return path


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from transformer_lm.api import load_run, read_run_config
    from transformer_lm.config import ModelConfig, TrainConfig
    from transformer_lm.interop.hf import export_hf, import_hf
    from transformer_lm.train import read_metrics, train
    from transformer_lm.train_data import training_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="pairs a step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--loss", default="sigmoid", help="the loss both train by (train.dpo_loss)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    lines = [ln for ln in (SHARED / "tinyshakespeare" / "input.txt").read_text().splitlines() if len(ln) > 20]
    train_pairs = make_pairs(tmp / "train.jsonl", lines, args.pairs, seed=0)
    eval_pairs = make_pairs(tmp / "eval.jsonl", lines, 64, seed=1)

    # (transformers 5 builds a 1-token tokenizer from vocab_file= / merges_file=: ../shared/PITFALLS.md)
    bpe = SHARED / "gpt2-bpe"
    merges = [tuple(ln.split()) for ln in (bpe / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if ln]
    tok = GPT2TokenizerFast(vocab=json.loads((bpe / "encoder.json").read_text(encoding="utf-8")), merges=merges)
    assert len(tok) == 50257, len(tok)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd,
                                    n_positions=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    hf.save_pretrained(tmp / "hf-base")
    tok.save_pretrained(tmp / "hf-base")
    base = import_hf(tmp / "hf-base", tmp / "base")

    # ours
    _, model_cfg = read_run_config(base)
    data = training_data(train_pairs, load_run(base, "cpu").tokenizer)
    cfg = TrainConfig(batch_size=args.batch, max_iters=args.steps, eval_interval=args.steps, eval_batches=1,
                      log_interval=1, warmup_iters=0, lr=1e-4, schedule="constant", weight_decay=0.0, grad_clip=0.0,
                      init_from=str(base), dpo_beta=0.1, dpo_loss=args.loss, device="cpu")
    train(ModelConfig.from_dict({**model_cfg.to_dict(), "dropout": 0.0}), cfg, data, tmp / "ours", progress=False)
    clock = [r["elapsed"] for r in read_metrics(tmp / "ours" / "metrics.jsonl") if "loss" in r]
    ours_step = statistics.median(b - a for a, b in zip(clock, clock[1:]))

    # TRL
    from datasets import load_dataset

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    settings = dict(output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, per_device_train_batch_size=args.batch,
                    per_device_eval_batch_size=8, max_steps=args.steps, learning_rate=1e-4,
                    lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, beta=0.1, max_length=128,
                    logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, seed=0)
    targs = DPOConfig(**settings, loss_type=[args.loss])
    trainer = DPOTrainer(model=GPT2LMHeadModel.from_pretrained(tmp / "hf-base"), args=targs,
                         train_dataset=load_dataset("json", data_files=str(train_pairs))["train"],
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    trl_step = statistics.median(times[1:])

    # agreement: our trained model scored by TRL's evaluation, against the same base, under each loss
    export_hf(tmp / "ours", tmp / "hf-ours")
    print(f"model: GPT-2 shape, {args.n_layer} layers × {args.n_embd}, {args.batch} pairs a step, float32, CPU "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"held-out pairs, our {args.loss} DPO model after {args.steps} steps against the base:")
    ours_run, agree = load_run(tmp / "ours", "cpu"), True
    losses = {"sigmoid": {}, "hinge": {}, "ipo": {}, "robust": {"label_smoothing": 0.1},
              "rpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}}
    for kind, trl_settings in losses.items():
        ours_run.config["train"].update(dpo_loss="sigmoid" if kind == "rpo" else kind,
                                        dpo_label_smoothing=trl_settings.get("label_smoothing", 0.0),
                                        dpo_nll_weight=1.0 if kind == "rpo" else 0.0)
        ours_eval = ours_run.evaluate(eval_pairs, batch_size=8, reference=base)
        judge_args = DPOConfig(**{**settings, "loss_type": [kind], **trl_settings})
        judge = DPOTrainer(model=GPT2LMHeadModel.from_pretrained(tmp / "hf-ours"),
                           ref_model=GPT2LMHeadModel.from_pretrained(tmp / "hf-base"), args=judge_args,
                           train_dataset=load_dataset("json", data_files=str(train_pairs))["train"],
                           eval_dataset=load_dataset("json", data_files=str(eval_pairs))["train"],
                           processing_class=tok)
        theirs = judge.evaluate()
        rows = [("loss", ours_eval.loss, theirs["eval_loss"]),
                ("reward accuracy", ours_eval.accuracy, theirs["eval_rewards/accuracies"]),
                ("reward margin", ours_eval.margin, theirs["eval_rewards/margins"])]
        print(f" {kind} ({ours_eval.pairs} pairs):")
        for name, a, b in rows:
            print(f"  {name:>16}: ours {a:.6f}  TRL {b:.6f}  |diff| {abs(a - b):.2e}")
        agree = agree and all(abs(a - b) <= 1e-4 for _, a, b in rows)
    print(f"step ({args.loss}): ours {ours_step * 1e3:.0f} ms, TRL {trl_step * 1e3:.0f} ms -> ours/TRL speed "
          f"{trl_step / ours_step:.2f}x")
    print(f"agreement within 1e-4: {'yes' if agree else 'NO'}")


if __name__ == "__main__":
    main()
