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
#   bash bench/gpu.sh breakdown              bench_breakdown: the engine's decode step at batch 16, 64, 256
#                                            (1k context; 256 also with penalties), per kernel group
#   bash bench/gpu.sh record                 the tests, a 64-client serving sample (plain, json, logprobs +
#                                            penalties, a shared prefix) and the multi-turn prefix cache
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
breakdown)  # this branch's GPU tests first (no late compile at a shape no preset has; the 256-row step), then the bench
  pt 200 tests/test_breakdown.py tests/test_warm_classes.py tests/test_decode_step_gpu.py > "$OUT/gpu_tests_breakdown_$TAG.log" 2>&1
  grep -E "passed|failed|FAILED|Error|late" "$OUT/gpu_tests_breakdown_$TAG.log" | tail -8
  timeout 360 python3 bench/bench_breakdown.py --out "$OUT/breakdown_$TAG.json" 2>&1 | quiet \
    | grep -v "^USDT\|^STAGE:" > "$OUT/breakdown_$TAG.log"
  tail -60 "$OUT/breakdown_$TAG.log"
  ;;
record)  # the short record for a one-call budget: every GPU test, then one server, then the cache
  # 1. every GPU test at once on this GPU: the slow real-shape MoE checks (fp64 references) in their
  # own processes beside the other kernel tests and the engine's
  for s in qwen3-235b-a22b user-config; do
    pt 280 --timeout=270 "tests/test_fused_moe.py::test_real_shapes_on_gpu[$s]" > "$OUT/gpu_tests_moe_${s}_$TAG.log" 2>&1 &
  done
  pt 280 $KERNEL_TESTS --deselect "tests/test_fused_moe.py::test_real_shapes_on_gpu[qwen3-235b-a22b]" \
    --deselect "tests/test_fused_moe.py::test_real_shapes_on_gpu[user-config]" > "$OUT/gpu_tests_kernels_$TAG.log" 2>&1 &
  pt 280 tests $(ignore) > "$OUT/gpu_tests_engine_$TAG.log" 2>&1
  wait
  for f in "$OUT"/gpu_tests_*_"$TAG".log; do echo "== $f"; grep -E "passed|failed|FAILED|Timeout" "$f" | tail -6; done
  # 2. one server, 64 clients, 1024 in / 256 out: plain beside json_schema, beside logprobs + penalties;
  # then 2,048 shared prompt tokens + 256 own against 2,304 own (nothing shared), the cache on in both
  # the 30b config beside the project's small test tokenizer: json_schema requests need a tokenizer.json
  # (ids past its 512 are never allowed by a grammar; plain requests sample the whole vocabulary)
  python3 -c "import json, sys; from pathlib import Path; from loader.presets import preset_config
from loader.writer import write_tokenizer; d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
(d / 'config.json').write_text(json.dumps(preset_config('qwen3-30b-a3b'))); write_tokenizer(d, 512)" /tmp/q30tok
  python3 -m engine serve --model /tmp/q30tok --load-format dummy --stages "$NGPU" --host 127.0.0.1 --port 8123 \
    --quiet > "$OUT/server_$TAG.log" 2>&1 &
  srv=$!
  for _ in $(seq 240); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health', timeout=2)" 2>/dev/null && break; sleep 1; done
  sv() { timeout 120 python3 bench/bench_serving.py --url http://127.0.0.1:8123 --concurrency 64 --num-prompts 64 \
    --vocab-size 151936 --output-len 256 "$@" 2>&1 | quiet; }
  { sv --input-len 1024 --json-share 0,0.5 --out "$OUT/serving_json_$TAG.json"
    sv --input-len 1024 --mix-share 0.5 --out "$OUT/serving_mix_$TAG.json"
    sv --input-len 2304 --out "$OUT/serving_noshare_$TAG.json"
    sv --input-len 256 --shared-prefix-tokens 2048 --out "$OUT/serving_shared_$TAG.json"; } > "$OUT/serving_$TAG.log"
  kill -INT $srv; for _ in $(seq 40); do kill -0 $srv 2>/dev/null || break; sleep 1; done; kill -9 $srv 2>/dev/null
  # 3. the multi-turn conversation to 90k and 128k with the cache on; turn 1 computes the whole prompt,
  # which is what every turn costs with the cache off
  timeout 150 python3 bench/bench_multiturn.py --target 90000,128000 --turns 4 --cache on \
    --out "$OUT/multiturn_$TAG.json" 2>&1 | quiet > "$OUT/multiturn_$TAG.log"
  grep -E "^ *(c|conc|64|plain|json|mix|kind)|tok/s|TTFT|TPOT" "$OUT/serving_$TAG.log" | tail -24; tail -22 "$OUT/multiturn_$TAG.log"
  (cd "$OUT" && tar czf "record_$TAG.tgz" --remove-files ./*_"$TAG".log ./*_"$TAG".json)  # a device call returns 8 files
  ;;
*)
  echo "usage: bash bench/gpu.sh tests|e2e|serving|kernels|breakdown|record [pytest args for tests]" >&2
  exit 2
  ;;
esac
