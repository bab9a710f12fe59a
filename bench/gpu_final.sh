#!/usr/bin/env bash
# The GPU record on a 4-GPU machine, one device call per step (each fits the 10-minute limit):
#   bash bench/gpu_final.sh main   # GPUs 0,1: peer + moepipe 2 stages + 1 GPU (bench_e2e); GPUs 2,3
#                                  #   meanwhile: the GPU tests (the fused-MoE ones alone on GPU 2, they
#                                  #   compile many shapes), then bench_decode_layer
#   bash bench/gpu_final.sh rest   # GPUs 0,1: bench_spine (with the 1,000-request soak), serving sweep;
#                                  #   GPU 2 meanwhile: parity of a user-mini checkpoint on CUDA
#   bash bench/gpu_final.sh four   # 4 GPUs: the user's config on 4 stages (90k prompt), profile --layers auto
#   bash bench/gpu_final.sh big    # 4 x H200: qwen3-235b-a22b on 4 stages
# Comparable figures (moepipe vs peer vs 1 GPU) are always taken on the same GPU pair in one call.
# Needs .shared/hf_peer.py and .shared/ceilings.py (copies of ../shared/bench) and, for the server,
# the wheels in .whl/ (carried). Results under $OUT; the short tables are printed last.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; L=/tmp/logs; mkdir -p "$OUT" "$L"  # at most 8 files come back: logs merge at the end
step=${1:-main}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
quiet() { grep -v ": loaded .* of \|unbatched P2P\|^$\|^\[moepipe\]"; }

if [ "$step" = main ]; then
  # fail fast: the tiny preset on 2 GPUs, greedy then sampled (plan, hops, graphs, sampler on CUDA)
  for t in 0 0.8; do
    CUDA_VISIBLE_DEVICES=0,1 timeout 150 python3 -m engine generate --model tiny --load-format dummy --stages 2 \
      --prompt-ids 11,12,13,14,15 --max-tokens 24 --temperature $t --top-p 0.9 --quiet || { echo "smoke failed"; exit 1; }
  done
  CUDA_VISIBLE_DEVICES=0,1 python3 .shared/ceilings.py | tee "$OUT/ceilings.jsonl"
  (  # every GPU test, split over GPUs 2 and 3 (Triton compiles per process), then the 2-GPU ones
    CUDA_VISIBLE_DEVICES=2 timeout 520 python3 -m pytest -q -m gpu -rf tests/test_fused_moe.py tests/test_fused_kernels.py \
      -p no:cacheprovider > "$L/gpu_tests_kernels.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=3 timeout 260 python3 -m pytest -q -m gpu tests/test_attention_kernels.py tests/test_chunking.py \
      -p no:cacheprovider > "$L/gpu_tests_attention.log" 2>&1
    CUDA_VISIBLE_DEVICES=3 timeout 200 python3 -m pytest -q -m gpu -rf tests -p no:cacheprovider \
      --ignore=tests/test_fused_moe.py --ignore=tests/test_fused_kernels.py --ignore=tests/test_dummy.py \
      --ignore=tests/test_attention_kernels.py --ignore=tests/test_chunking.py \
      > "$L/gpu_tests_rest.log" 2>&1
    CUDA_VISIBLE_DEVICES=3 timeout 120 python3 bench/bench_decode_layer.py --out "$OUT/decode_layer.json" \
      > "$L/decode_layer.log" 2>&1
    wait
  ) &
  side=$!
  CUDA_VISIBLE_DEVICES=0,1 timeout 390 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --ckpt /tmp/q30 --stages 2 \
    --peer .shared/hf_peer.py --one-gpu --mixed --out "$OUT/e2e.json" 2>&1 | quiet | tee "$L/e2e.log" | tail -45
  wait $side
  tail -6 "$L/decode_layer.log"
  for f in "$L"/gpu_tests_*.log; do echo "== $f"; tail -4 "$f"; done
  cat "$L"/gpu_tests_*.log > "$OUT/gpu_tests.log"; cat "$L"/e2e.log "$L"/decode_layer.log > "$OUT/bench.log"
elif [ "$step" = rest ]; then
  if [ -d .whl ]; then  # the server's stack (fastapi, uvicorn, ...): only this step needs it
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  CUDA_VISIBLE_DEVICES=2 OUT=$OUT timeout 200 bash bench/gpu_4stage.sh parity > "$L/parity.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0,1 timeout 300 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b \
    --stages 2 --out "$OUT/spine.json" 2>&1 | quiet | tee "$L/spine.log" | tail -20
  CUDA_VISIBLE_DEVICES=0,1 timeout 200 python3 bench/bench_serving.py --model qwen3-30b-a3b --stages 2 \
    --serve-args "--load-format dummy" --concurrency 1,8,64,256 --input-len 1024 --output-len 256 \
    --out "$OUT/serving.json" 2>&1 | quiet | tee "$L/serving.log" | tail -12
  wait
  tail -8 "$L/parity.log"
  cat "$L"/*.log > "$OUT/rest.log"
elif [ "$step" = four ]; then  # 4 GPUs: the user's config (244 GB) with a 90k prompt, then the timeline and auto split
  timeout 300 python3 bench/bench_4stage.py --model bench/user-config.json --stages 4 --prompt-len 90000 \
    --out "$OUT/4stage_user.json" 2>&1 | quiet | tail -20
  OUT=$OUT timeout 250 bash bench/gpu_4stage.sh profile 2>&1 | quiet | tail -20
elif [ "$step" = big ]; then  # 4 x H200 only: 470 GB of weights
  timeout 500 python3 bench/bench_4stage.py --model qwen3-235b-a22b --stages 4 --prompt-len 90000 \
    --out "$OUT/4stage_235b.json" 2>&1 | quiet | tail -20
else
  echo "usage: bash bench/gpu_final.sh main|rest|four|big" >&2
  exit 2
fi
