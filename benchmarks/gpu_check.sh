#!/usr/bin/env bash
# GPU checks (one short run on a lent GPU machine), the open targets first: issue 4's performance rows (124M training
# MFU in bf16 with compile, decode MBU at batch 1, GPU-vs-CPU greedy agreement; benchmarks/gpu_perf.py, whose
# diagnostic rows run only where they would end within GPU_PERF_BUDGET_S seconds), then the gpu-marked tests
# (bf16/fp16 autocast training, a bf16 LoRA fine-tune, torch.compile, CUDA-graphed decode, the fused loss on CUDA)
# and the default `tlm train` on CUDA, timed. Each stage is stopped at its cap (below: 540 s in all at the default budget, most of it compiling),
# so that one that hangs or runs long cannot take the later stages' time, and the whole run ends inside the ~9 minutes
# a lent machine's one command is given (a larger GPU_PERF_BUDGET_S lengthens it as much). The GPU image has torch
# but not jsonargparse: carry its wheels in .gpu_wheels/ (pip download --no-deps -d .gpu_wheels jsonargparse
# docstring-parser typeshed-client).
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"

stage() {  # stage SECONDS COMMAND...: run COMMAND, stopped after SECONDS, and say so when it was
  local cap=$1
  shift
  timeout "$cap" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ]; then echo "STOPPED at its ${cap} s cap: $*"; fi
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# .gpu_wheels/ is git-ignored: it reaches the GPU machine only when the run names it in `carry`
[ -d .gpu_wheels ] || echo "no .gpu_wheels/ here (carry it): the tlm train and sample stages will fail"
python3 -m pip install -q --no-index --find-links .gpu_wheels jsonargparse docstring-parser typeshed-client 2>&1 | tail -1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
export PYTHONPATH=$PWD/src TLM_CACHE_DIR=/tmp/tlm-cache PYTHONUNBUFFERED=1
budget=${GPU_PERF_BUDGET_S:-240}  # whole seconds; its stage's cap is 50 s more (start-up, and targets that run long)
stage $((budget + 50)) python3 benchmarks/gpu_perf.py --budget_s "$budget" --json "$out/gpu_perf.json" 2>&1 \
  | tee "$out/gpu_perf.txt"
stage 170 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
TIMEFORMAT="wall %R s"  # bash's own timer: nothing says the image has GNU time (/usr/bin/time)
{ time stage 60 python3 -m transformer_lm.cli train --out /tmp/gpu-run --train.device cuda; } 2>&1 | tail -5 \
  | tee "$out/default_train.txt"
stage 20 python3 -m transformer_lm.cli sample /tmp/gpu-run "def " --max_new_tokens 300 --seed 0 2>&1 \
  | tee "$out/sample.txt"
