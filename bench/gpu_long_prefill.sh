#!/usr/bin/env bash
# Long-prompt prefill check on one GPU: the paged flash-attention kernel's GPU tests (real shapes,
# 4200-token chunked parity), bench_attention.py's prefill cases beside SDPA and the older Triton
# kernel (with a tile sweep), and the chunk cost timings and fit. Results under $OUT.
#   OUT=/tmp/out bash bench/gpu_long_prefill.sh           # everything (~2 min on H100)
#   OUT=/tmp/out bash bench/gpu_long_prefill.sh --short   # key tests, 3 cases, refit (~60 s)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${1:-}" = "--short" ]; then
  tests=(-k "gpu_fa_chunk or (gpu_fa_dynamic and 16) or (gpu_fa_shapes and 48)")
  bench=(--cases "prefill 4k at 0,prefill 4k at 32k,prefill 4k at 86k")
  fit=(--reps 3)
else
  tests=(-k gpu_fa)
  bench=(--sweep)
  fit=()
fi
python3 -m pytest -q -m gpu "${tests[@]}" tests/test_attention_kernels.py tests/test_chunking.py -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
python3 bench/fit_chunk_cost.py --measure "${fit[@]}" --out "$OUT/chunk_cost.json" 2>&1 | tee "$OUT/fit.log" | tail -20
python3 bench/bench_attention.py --only prefill "${bench[@]}" --out "$OUT/attention_kernels.json" 2>&1 | grep -v '^\.\.\.'
