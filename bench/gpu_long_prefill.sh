#!/usr/bin/env bash
# Long-prompt prefill check on one GPU: the paged flash-attention kernel's GPU tests (real shapes,
# 4200-token chunked parity), bench_attention.py's prefill cases beside SDPA and the older Triton
# kernel (with a tile sweep), then the chunk cost timings and fit. Results under $OUT.
#   OUT=/tmp/out bash bench/gpu_long_prefill.sh [--no-sweep]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
sweep=--sweep
[ "${1:-}" = "--no-sweep" ] && sweep=
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu -k gpu_fa tests/test_attention_kernels.py tests/test_chunking.py -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
python3 bench/bench_attention.py --only prefill $sweep --out "$OUT/attention_kernels.json" 2>&1 | grep -v '^\.\.\.'
python3 bench/fit_chunk_cost.py --measure --out "$OUT/chunk_cost.json" 2>&1 | tee "$OUT/fit.log" | tail -20
