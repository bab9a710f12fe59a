#!/usr/bin/env bash
# The GPU record, one suite per device call (each fits a 10-minute call on one H200; on 2+ GPUs the
# pipeline runs one stage per GPU and the GPU tests spread over them). Needs nothing outside the
# repo; the server's wheels (fastapi, uvicorn, ... for `serving`) travel in .whl/ when the machine
# has no index, and are installed from there if present.
#   bash bench/gpu.sh tests   [pytest args]  every @pytest.mark.gpu test
#   bash bench/gpu.sh e2e                    bench_e2e beside the transformers peer (bench/hf_peer.py),
#                                            the card's ceilings (bench/ceilings.py) and, on 2+ GPUs, 1 GPU
#   bash bench/gpu.sh serving                bench_serving: 1024 in / 256 out at 1, 8, 64, 256 clients
#   bash bench/gpu.sh kernels                bench_decode_layer, bench_sampler, bench_attention
# Results (JSON and logs) go to $OUT (default bench/results/run), named <kind>_<card>x<gpus>_<date>;
# the short tables are printed last.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
suite=${1:-}; shift || true
OUT=${OUT:-bench/results/run}; mkdir -p "$OUT"
NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/ .*//')
TAG=${CARD}x${NGPU}_$(date +%F)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'commit', '$(git rev-parse --short HEAD 2>/dev/null)')"
if compgen -G ".whl/*.whl" > /dev/null; then  # server and grammar packages the machine lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/moepipe-site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/moepipe-site || { echo "error: installing .whl/ failed"; exit 1; }
fi
quiet() { grep -v ": loaded .* of \|unbatched P2P\|^$\|^\[moepipe\]"; }
# -v and durations: the log names a test that hangs or crawls; a per-test timeout keeps one from taking the call
pt() { timeout "$1" python3 -m pytest -v -m gpu -rf -p no:cacheprovider --durations=15 --timeout=150 \
  --continue-on-collection-errors "${@:2}"; }
KERNEL_TESTS="tests/test_fused_moe.py tests/test_fused_kernels.py tests/test_linear_small.py tests/test_attention_kernels.py tests/test_chunking.py"
ignore() { for f in $KERNEL_TESTS; do printf -- "--ignore=%s " "$f"; done; }

case "$suite" in
tests)
  if [ "$NGPU" -ge 2 ]; then  # kernels on the last GPU beside the engine's tests on the others
    CUDA_VISIBLE_DEVICES=$((NGPU - 1)) pt 560 $KERNEL_TESTS "$@" > "$OUT/gpu_tests_kernels_$TAG.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((NGPU - 2))) pt 560 tests $(ignore) "$@" > "$OUT/gpu_tests_engine_$TAG.log" 2>&1
    wait
  else  # one GPU: both at once (Triton compiles on the host's cores, the tests' shapes are small)
    pt 540 $KERNEL_TESTS "$@" > "$OUT/gpu_tests_kernels_$TAG.log" 2>&1 &
    pt 540 tests $(ignore) "$@" > "$OUT/gpu_tests_engine_$TAG.log" 2>&1
    wait
  fi
  for f in "$OUT"/gpu_tests_*_"$TAG".log; do echo "== $f"; grep -E "passed|failed|error|FAILED|Timeout|Triton compiled" "$f" | tail -12; done
  ;;
e2e)
  python3 bench/ceilings.py | tee "$OUT/ceilings_$TAG.jsonl"
  one=(); [ "$NGPU" -ge 2 ] && one=(--one-gpu)
  timeout 540 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --stages "$NGPU" --long "" \
    --peer bench/hf_peer.py --peer-prefill 2048,8192 "${one[@]}" --out "$OUT/e2e_$TAG.json" 2>&1 | quiet \
    > "$OUT/e2e_$TAG.log"
  tail -16 "$OUT/e2e_$TAG.log"
  ;;
serving)
  timeout 560 python3 bench/bench_serving.py --model qwen3-30b-a3b --stages "$NGPU" --serve-args "--load-format dummy" \
    --concurrency 1,8,64,256 --input-len 1024 --output-len 256 --out "$OUT/serving_$TAG.json" 2>&1 | quiet \
    > "$OUT/serving_$TAG.log"
  tail -12 "$OUT/serving_$TAG.log"
  ;;
kernels)
  timeout 200 python3 bench/bench_decode_layer.py --layers 4 --skip-first-request --out "$OUT/decode_layer_$TAG.json" \
    > "$OUT/decode_layer_$TAG.log" 2>&1
  timeout 100 python3 bench/bench_sampler.py --out "$OUT/sampler_$TAG.json" > "$OUT/sampler_$TAG.log" 2>&1
  timeout 200 python3 bench/bench_attention.py --out "$OUT/attention_kernels_$TAG.json" > "$OUT/attention_$TAG.log" 2>&1
  tail -14 "$OUT/decode_layer_$TAG.log"; tail -10 "$OUT/sampler_$TAG.log"; tail -16 "$OUT/attention_$TAG.log"
  ;;
*)
  echo "usage: bash bench/gpu.sh tests|e2e|serving|kernels [pytest args for tests]" >&2
  exit 2
  ;;
esac
