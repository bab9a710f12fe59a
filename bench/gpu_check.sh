#!/usr/bin/env bash
# One device call: GPU tests, kernel bench, then an end-to-end run. Usage on the device machine:
#   bash bench/gpu_check.sh smoke|full
set -uo pipefail
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mode=${1:-smoke}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "$mode" = smoke ]; then
  timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_attention_kernels.py -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  timeout 90 python3 bench/bench_attention.py --out "$OUT/attention_kernels.json" 2>&1 | tail -20
  timeout 200 python3 bench/bench_e2e.py --ckpt /tmp/q30-4l --layers-override 4 --prefill 2048,8192 --long 32000 \
      --out "$OUT/e2e_smoke.json" 2>&1 | grep -v ": loaded .* of " | tail -30
elif [ "$mode" = perf ]; then
  timeout 120 python3 bench/profile_stage.py --layers 4 --out "$OUT/profile_stage.json" 2>&1 | grep -v "^\(--\|void\|_Z\|nvjet\|cudnn\|  \)" | tail -20
  timeout 170 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests2.log" | tail -8
  python3 bench/bench_e2e.py --ckpt /tmp/q30 --stages 2 --peer .shared/hf_peer.py --mixed "${@:2}" 2>&1 | grep -v ": loaded .* of \|unbatched P2P\|^$"
elif [ "$mode" = final ]; then
  timeout 60 python3 -m pytest -q -m gpu tests/test_gpu.py -k fused 2>&1 | tail -3
  timeout 150 python3 bench/profile_stage.py --layers 4 --out "$OUT/profile_stage.json" 2>&1 | grep -v "^\(--\|void\|_Z\|nvjet\|cudnn\|  \|Name\|Self\)" | tail -24
  timeout 170 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
  python3 bench/bench_e2e.py --ckpt /tmp/q30 --stages 2 --peer .shared/hf_peer.py --mixed "${@:2}" 2>&1 | grep -v ": loaded .* of \|unbatched P2P\|^$"
else
  df -h /tmp | tail -1
  python3 bench/bench_e2e.py --ckpt /tmp/q30 --stages 2 --peer .shared/hf_peer.py "${@:2}" 2>&1 | grep -v ": loaded .* of "
fi
