#!/usr/bin/env bash
# Tiny Shakespeare, char-level, with nanoGPT's published CPU recipe's shape and budget, run with tlm:
#   4 layers, 4 heads, 128 dims, context 64, batch 12, 2000 iterations, dropout 0, 100 warmup steps, AdamW beta2 0.99,
#   weight decay 0.1, clip 1.0 (nanoGPT config/train_shakespeare_char.py + its README's CPU overrides).
# One change: peak lr 3e-3 cosine to 3e-4 instead of nanoGPT's 1e-3 → 1e-4 (which lands at val 1.8897 here; pass
# --lr 1e-3 to reproduce it). nanoGPT reports val loss ~1.88. The final evaluation covers the whole val split.
# Usage: bash benchmarks/shakespeare_char.sh [path/to/input.txt] [--lr LR]
set -euo pipefail
input=${1:-../shared/data/tinyshakespeare/input.txt}
lr=3e-3
if [[ "${2:-}" == "--lr" ]]; then lr=$3; fi
work=${TLM_BENCH_DIR:-/tmp/tlm-shakespeare}
tlm prepare "$input" --out "$work/data" --tokenizer char --overwrite true
/usr/bin/time -f "wall %e s" tlm train "$work/data" --out "$work/run" --overwrite true \
  --model.n_layer 4 --model.n_head 4 --model.n_embd 128 --model.block_size 64 --model.dropout 0 \
  --train.batch_size 12 --train.max_iters 2000 --train.lr "$lr" --train.min_lr_ratio 0.1 --train.warmup_iters 100 \
  --train.beta2 0.99 --train.weight_decay 0.1 --train.grad_clip 1.0 --train.eval_interval 2000 \
  --train.eval_batches 1000 --train.seed 1337
tlm sample "$work/run" "ROMEO:" --max_new_tokens 200 --seed 0
