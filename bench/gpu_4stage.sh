#!/usr/bin/env bash
# Issue 10 on a 4-GPU machine, one step per call (each fits the 10-minute limit):
#   bash bench/gpu_4stage.sh parity   # 1 GPU: parity report of a user-mini checkpoint in bf16 on CUDA
#   bash bench/gpu_4stage.sh profile  # 4 GPUs: user config (dummy weights), --layers auto, timeline
#   bash bench/gpu_4stage.sh bench    # 4 GPUs: user config, 90k prompt: TTFT, decode, busy, memory vs plan
# Results go to $OUT (default bench/results); the last lines printed are the short tables.
set -euo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
TMP=${TMPDIR:-/tmp}
step=${1:-bench}

if [ "$step" = parity ]; then
  python -m engine make-checkpoint --preset user-mini --out "$TMP/user-mini" --force
  python -m engine parity --model "$TMP/user-mini" --device cuda --tokens 64 --json > "$OUT/parity_user-mini_cuda.json" \
    || echo "parity: some row failed (see the JSON)"
  python -m engine parity --model "$TMP/user-mini" --device cuda --tokens 64 | tail -8
elif [ "$step" = profile ]; then
  mkdir -p "$TMP/user-config" && cp bench/user-config.json "$TMP/user-config/config.json"
  python -m engine profile --model "$TMP/user-config" --load-format dummy --stages 4 --layers auto \
    --max-model-len 8192 --batch 16 --prompt-len 2048 --max-tokens 32 --trace "$OUT/trace_user_4stage.json" --quiet
elif [ "$step" = bench ]; then
  python bench/bench_4stage.py --model bench/user-config.json --stages 4 --prompt-len 90000 \
    --out "$OUT/4stage_user.json"
else
  echo "usage: bash bench/gpu_4stage.sh parity|profile|bench" >&2
  exit 2
fi
