#!/usr/bin/env bash
# GPU checks (one short run on a lent GPU machine), the open targets first: issue 4's performance rows (124M training
# MFU in bf16 with compile, decode MBU at batch 1, GPU-vs-CPU greedy agreement; benchmarks/gpu_perf.py, which skips
# its diagnostic rows once GPU_PERF_BUDGET_S seconds have passed), then the gpu-marked tests (bf16/fp16 autocast
# training, torch.compile, CUDA-graphed decode, the fused loss on CUDA) and the default `tlm train` on CUDA, timed.
# About 8-9 minutes on an H200 (most of it compiling). The GPU image has torch but not jsonargparse: carry its wheels
# in .gpu_wheels/ (pip download --no-deps -d .gpu_wheels jsonargparse docstring-parser typeshed-client).
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --find-links .gpu_wheels jsonargparse docstring-parser typeshed-client 2>&1 | tail -1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
export PYTHONPATH=$PWD/src TLM_CACHE_DIR=/tmp/tlm-cache PYTHONUNBUFFERED=1
python3 benchmarks/gpu_perf.py --budget_s "${GPU_PERF_BUDGET_S:-240}" --json "$out/gpu_perf.json" 2>&1 \
  | tee "$out/gpu_perf.txt"
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
/usr/bin/time -f "wall %e s" python3 -m transformer_lm.cli train --out /tmp/gpu-run --train.device cuda \
  2>&1 | tail -5 | tee "$out/default_train.txt"
python3 -m transformer_lm.cli sample /tmp/gpu-run "def " --max_new_tokens 300 --seed 0 2>&1 | tee "$out/sample.txt"
