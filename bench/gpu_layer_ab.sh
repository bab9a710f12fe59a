#!/usr/bin/env bash
# 1 GPU, one device call: the per-layer decode A/B of this tree against a snapshot of older code,
# then the kernel GPU tests of model/. Make the snapshot first (ignored by git, carried):
#   rm -rf .old && mkdir .old && git archive <rev> model engine loader bench | tar -x -C .old
#   cp bench/bench_decode_layer.py .old/bench/   # the same benchmark for both (drop --ablate variants it lacks)
#   bash bench/gpu_layer_ab.sh [batches] [contexts]    (device: carry .old)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=${1:-1,8}; C=${2:-128,32768}; L=${LAYERS:-4}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -d .old ]; then
  timeout 170 python3 .old/bench/bench_decode_layer.py --layers $L --batches $B --contexts $C --skip-moe \
    --skip-first-request --out "$OUT/layer_old.json" > "$OUT/layer_old.log" 2>&1
fi
timeout 260 python3 bench/bench_decode_layer.py --layers $L --batches $B --contexts $C --skip-moe --ablate \
  --skip-first-request --out "$OUT/layer_new.json" > "$OUT/layer_new.log" 2>&1
timeout ${TEST_S:-150} python3 -m pytest -q -m gpu -rf -p no:cacheprovider ${TESTS:-tests/test_linear_small.py \
  tests/test_fused_moe.py tests/test_attention_kernels.py tests/test_fused_kernels.py} > "$OUT/tests.log" 2>&1
echo "== old"; grep -A16 "^kernels of one" "$OUT/layer_old.log" 2>/dev/null; grep "^decode" "$OUT/layer_old.log" 2>/dev/null
echo "== new"; grep -A16 "^kernels of one" "$OUT/layer_new.log"; grep "^decode\|rror" "$OUT/layer_new.log"
echo "== tests"; tail -5 "$OUT/tests.log"
