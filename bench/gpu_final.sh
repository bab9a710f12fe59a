#!/usr/bin/env bash
# The GPU record on a 4 x H200 machine, one device call per step (each fits the 10-minute limit):
#   bash bench/gpu_final.sh main   # GPUs 0,1: peer + moepipe 2 stages + 1 GPU (bench_e2e); GPUs 2,3
#                                  #   meanwhile: the GPU tests (the fused-MoE ones alone on GPU 2),
#                                  #   then bench_decode_layer and bench_sampler
#   bash bench/gpu_final.sh rest   # GPUs 0,1: bench_spine (with the 1,000-request soak); GPU 2
#                                  #   meanwhile: parity of a user-mini checkpoint on CUDA; then all 4:
#                                  #   the user's config on 4 stages with a 90k prompt (bench_4stage)
#   bash bench/gpu_final.sh big    # 4 GPUs: profile --layers auto of the user's config (timeline),
#                                  #   then qwen3-235b-a22b on 4 stages (470 GB: H200 only)
#   bash bench/gpu_final.sh serve  # GPUs 0,1: the serving sweep (needs the wheels in .whl/)
#   bash bench/gpu_final.sh one    # with little device time: GPU tests (GPUs 2,3) beside bench_spine and
#                                  #   its soak (0,1), then the user's config on 4 stages, 90k prompt
#   bash bench/gpu_final.sh tail   # a short follow-up: bench_decode_layer (GPU 0), bench_sampler (GPU 1)
#   bash bench/gpu_final.sh rec1; ... rec2; ... rec3   # the whole record in three calls on one held
#                                  #   4 x H200 machine (rec3: the 235b, 90k prompt with YaRN factor 4)
#   bash bench/gpu_final.sh check2 # 2 GPUs: the smaller kernel tests, the engine's GPU tests, bench_spine
#                                  #   without the soak (sampling in 3 alternating rounds, with timelines)
#   bash bench/gpu_final.sh verify # 1 GPU: the late-compile test, the sampler and attention-kernel GPU tests
#   bash bench/gpu_final.sh async1 # 2 GPUs: bench_spine without the soak, with and without async scheduling;
#                                  #   then the engine's GPU tests (test_gpu.py, test_sampler.py)
#   bash bench/gpu_final.sh async2 # 2 GPUs: the engine's GPU tests; then the 1 000-request soak
#   bash bench/gpu_final.sh async3 [engine] # 2 GPUs: the kernel GPU tests split over both [then the engine's]
#   bash bench/gpu_final.sh e2e    # 2 GPUs: bench_e2e beside the peer and 1 GPU, .old/'s decode rows, engine tests
#   bash bench/gpu_final.sh b1     # 2 GPUs: bench_spine's batch-1 decode (2 stages, 1 GPU; async and plain)
# Comparable figures (moepipe vs peer vs 1 GPU) are always taken on the same GPU pair in one call.
# Needs .shared/hf_peer.py and .shared/ceilings.py (copies of ../shared/bench). Results under $OUT;
# the short tables are printed last.
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
  (  # every GPU test, split over GPUs 2 and 3 (Triton compiles per process); the 2-GPU ones on 3,2
    ( CUDA_VISIBLE_DEVICES=2 timeout 330 python3 -m pytest -q -m gpu -rf tests/test_fused_moe.py tests/test_fused_kernels.py \
      -p no:cacheprovider > "$L/gpu_tests_kernels.log" 2>&1
      CUDA_VISIBLE_DEVICES=2 timeout 60 python3 bench/bench_sampler.py --out "$OUT/sampler.json" > "$L/sampler.log" 2>&1 ) &
    CUDA_VISIBLE_DEVICES=3 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_kernels.py tests/test_chunking.py \
      -p no:cacheprovider > "$L/gpu_tests_attention.log" 2>&1
    CUDA_VISIBLE_DEVICES=3,2 timeout 200 python3 -m pytest -q -m gpu -rf tests -p no:cacheprovider \
      --ignore=tests/test_fused_moe.py --ignore=tests/test_fused_kernels.py --ignore=tests/test_dummy.py \
      --ignore=tests/test_attention_kernels.py --ignore=tests/test_chunking.py \
      > "$L/gpu_tests_rest.log" 2>&1
    CUDA_VISIBLE_DEVICES=3 timeout 110 python3 bench/bench_decode_layer.py --skip-first-request --out "$OUT/decode_layer.json" \
      > "$L/decode_layer.log" 2>&1
    wait
  ) &
  side=$!
  CUDA_VISIBLE_DEVICES=0,1 timeout 420 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --ckpt /tmp/q30 --stages 2 \
    --peer .shared/hf_peer.py --one-gpu --mixed --out "$OUT/e2e.json" 2>&1 | quiet | tee "$L/e2e.log" | tail -45
  wait $side
  tail -6 "$L/decode_layer.log"; tail -12 "$L/sampler.log"
  for f in "$L"/gpu_tests_*.log; do echo "== $f"; tail -4 "$f"; done
  cat "$L"/gpu_tests_*.log > "$OUT/gpu_tests.log"; cat "$L"/e2e.log "$L"/decode_layer.log "$L"/sampler.log > "$OUT/bench.log"
elif [ "$step" = one ]; then  # everything the issues need on the final code, in one call (short budget)
  ( CUDA_VISIBLE_DEVICES=2 timeout 290 python3 -m pytest -q -m gpu -rf tests/test_fused_moe.py tests/test_fused_kernels.py \
      -p no:cacheprovider > "$L/gpu_tests_kernels.log" 2>&1 ) &
  ( CUDA_VISIBLE_DEVICES=3 timeout 110 python3 -m pytest -q -m gpu -rf tests/test_attention_kernels.py tests/test_chunking.py \
      -p no:cacheprovider > "$L/gpu_tests_attention.log" 2>&1
    CUDA_VISIBLE_DEVICES=3,2 timeout 175 python3 -m pytest -q -m gpu -rf tests -p no:cacheprovider \
      --ignore=tests/test_fused_moe.py --ignore=tests/test_fused_kernels.py --ignore=tests/test_dummy.py \
      --ignore=tests/test_attention_kernels.py --ignore=tests/test_chunking.py > "$L/gpu_tests_rest.log" 2>&1 ) &
  CUDA_VISIBLE_DEVICES=0,1 timeout 290 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b \
    --stages 2 --out "$OUT/spine.json" 2>&1 | quiet > "$L/spine.log"
  wait
  timeout 215 python3 bench/bench_4stage.py --model bench/user-config.json --stages 4 --prompt-len 90000 \
    --out "$OUT/4stage_user.json" 2>&1 | quiet > "$L/4stage.log"
  cat "$L"/gpu_tests_*.log > "$OUT/gpu_tests.log"; cat "$L"/spine.log "$L"/4stage.log > "$OUT/bench.log"
  for f in "$L"/gpu_tests_*.log; do echo "== $f"; tail -5 "$f"; done
  tail -16 "$L/spine.log"; tail -22 "$L/4stage.log"
elif [ "$step" = rec1 ]; then  # record 1 of 3 (~8 min): bench_e2e on 0,1; every GPU test split over 2,3
  CUDA_VISIBLE_DEVICES=0,1 timeout 60 python3 .shared/ceilings.py > "$OUT/ceilings.jsonl"
  pt() { timeout "$1" python3 -m pytest -q -m gpu -rf -p no:cacheprovider "${@:2}"; }
  (
    ( export CUDA_VISIBLE_DEVICES=2
      pt 220 tests/test_fused_moe.py -k 235b > "$L/gpu_tests_moe_235b.log" 2>&1
      pt 120 tests/test_attention_kernels.py tests/test_chunking.py > "$L/gpu_tests_attention.log" 2>&1
      timeout 110 python3 bench/bench_decode_layer.py --skip-first-request --out "$OUT/decode_layer.json" \
        > "$L/decode_layer.log" 2>&1 ) &
    ( export CUDA_VISIBLE_DEVICES=3
      pt 220 tests/test_fused_moe.py -k user-config > "$L/gpu_tests_moe_user.log" 2>&1
      pt 120 tests/test_fused_moe.py tests/test_fused_kernels.py -k "not 235b and not user-config" \
        > "$L/gpu_tests_moe_rest.log" 2>&1
      timeout 80 python3 bench/bench_sampler.py --out "$OUT/sampler.json" > "$L/sampler.log" 2>&1 ) &
    wait
    CUDA_VISIBLE_DEVICES=3,2 pt 170 tests --ignore=tests/test_fused_moe.py --ignore=tests/test_fused_kernels.py \
      --ignore=tests/test_dummy.py --ignore=tests/test_attention_kernels.py --ignore=tests/test_chunking.py \
      > "$L/gpu_tests_rest.log" 2>&1
  ) &
  side=$!
  CUDA_VISIBLE_DEVICES=0,1 timeout 500 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --ckpt /tmp/q30 --stages 2 \
    --peer .shared/hf_peer.py --one-gpu --mixed --out "$OUT/e2e.json" 2>&1 | quiet > "$L/e2e.log"
  wait $side
  for f in "$L"/gpu_tests_*.log; do echo "== $f"; grep -E "passed|failed|error|FAILED" "$f" | tail -4; done
  cat "$L"/gpu_tests_*.log > "$OUT/gpu_tests.log"; cat "$L"/e2e.log "$L"/decode_layer.log "$L"/sampler.log > "$OUT/bench.log"
  tail -12 "$L/sampler.log"; tail -8 "$L/decode_layer.log"; tail -40 "$L/e2e.log"
elif [ "$step" = rec2 ]; then  # record 2 of 3 (~8 min): bench_spine + soak on 0,1, parity on 2; then profile --layers auto
  CUDA_VISIBLE_DEVICES=2 OUT=$OUT timeout 200 bash bench/gpu_4stage.sh parity > "$L/parity.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0,1 timeout 330 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b \
    --stages 2 --out "$OUT/spine.json" 2>&1 | quiet > "$L/spine.log"
  wait
  OUT=$OUT timeout 200 bash bench/gpu_4stage.sh profile 2>&1 | quiet > "$L/profile.log"
  cat "$L"/*.log > "$OUT/rec2.log"
  tail -8 "$L/parity.log"; tail -30 "$L/profile.log"; tail -24 "$L/spine.log"
elif [ "$step" = rec3 ]; then  # record 3 of 3 (~6 min, 4 x H200 only): qwen3-235b-a22b on 4 stages, 90k prompt (YaRN 4)
  timeout 540 python3 bench/bench_4stage.py --model qwen3-235b-a22b --stages 4 --prompt-len 90000 --yarn 4 \
    --out "$OUT/4stage_235b.json" 2>&1 | quiet | tee "$L/235b.log" | tail -30
  cp "$L/235b.log" "$OUT/"
elif [ "$step" = check2 ]; then  # 2 GPUs (~6 min): the smaller kernel tests, the engine's GPU tests, bench_spine (no soak)
  pt() { timeout "$1" python3 -m pytest -q -m gpu -rf -p no:cacheprovider "${@:2}"; }
  CUDA_VISIBLE_DEVICES=0 pt 120 tests/test_fused_moe.py tests/test_fused_kernels.py -k "not 235b and not user-config" \
    > "$L/gpu_tests_moe_rest.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 pt 120 tests/test_attention_kernels.py tests/test_chunking.py > "$L/gpu_tests_attention.log" 2>&1
  wait
  CUDA_VISIBLE_DEVICES=0,1 pt 240 tests --ignore=tests/test_fused_moe.py --ignore=tests/test_fused_kernels.py \
    --ignore=tests/test_dummy.py --ignore=tests/test_attention_kernels.py --ignore=tests/test_chunking.py \
    > "$L/gpu_tests_rest.log" 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout 240 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b \
    --stages 2 --skip soak --trace "$OUT/trace_spine" --out "$OUT/spine.json" 2>&1 | quiet > "$L/spine.log"
  cat "$L"/gpu_tests_*.log > "$OUT/gpu_tests.log"; cp "$L/spine.log" "$OUT/"
  for f in "$L"/gpu_tests_*.log; do echo "== $f"; grep -E "passed|failed|error|FAILED" "$f" | tail -4; done
  tail -14 "$L/spine.log"
elif [ "$step" = async1 ]; then  # 2 GPUs (~8 min)
  pt() { timeout "$1" python3 -m pytest -q -m gpu -rf -p no:cacheprovider "${@:2}"; }
  CUDA_VISIBLE_DEVICES=0,1 timeout 330 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b \
    --stages 2 --skip soak --out "$OUT/spine.json" 2>&1 | quiet > "$L/spine.log"
  CUDA_VISIBLE_DEVICES=0,1 pt 330 tests/test_gpu.py tests/test_sampler.py > "$OUT/gpu_tests_engine.log" 2>&1
  cp "$L/spine.log" "$OUT/"
  grep -E "passed|failed|error|FAILED|compiled" "$OUT/gpu_tests_engine.log" | tail -6
  tail -16 "$L/spine.log"
elif [ "$step" = async2 ]; then  # 2 GPUs (~7 min): the engine's GPU tests, then the 1 000-request soak
  timeout 330 python3 -m pytest -q -m gpu -rf -p no:cacheprovider tests/test_gpu.py tests/test_sampler.py \
    > "$OUT/gpu_tests_engine.log" 2>&1
  timeout 200 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b \
    --stages 2 --skip sampling,balance,decode,single,plain --out "$OUT/soak.json" > "$OUT/soak.log" 2>&1
  grep -E "passed|failed|error|FAILED|Triton compiled" "$OUT/gpu_tests_engine.log" | tail -8
  grep "Triton compiled" "$OUT/soak.log" | head -5; tail -12 "$OUT/soak.log"
elif [ "$step" = async3 ]; then  # 2 GPUs (~5 min): the kernel GPU tests split over both
  pt() { timeout "$1" python3 -m pytest -q -m gpu -rf -p no:cacheprovider "${@:2}"; }
  { CUDA_VISIBLE_DEVICES=0 pt 230 tests/test_fused_moe.py -k 235b
    CUDA_VISIBLE_DEVICES=0 pt 100 tests/test_attention_kernels.py tests/test_chunking.py
    CUDA_VISIBLE_DEVICES=0 pt 100 tests/test_linear_small.py; } > "$L/gpu_tests_a.log" 2>&1 &
  { CUDA_VISIBLE_DEVICES=1 pt 230 tests/test_fused_moe.py -k user-config
    CUDA_VISIBLE_DEVICES=1 pt 100 tests/test_fused_moe.py -k "not 235b and not user-config"
    CUDA_VISIBLE_DEVICES=1 timeout 100 python3 -m pytest -q -rf -p no:cacheprovider tests/test_fused_kernels.py  # on CUDA when there
  } > "$L/gpu_tests_b.log" 2>&1
  wait
  cat "$L"/gpu_tests_*.log > "$OUT/gpu_tests_kernels.log"
  grep -E "passed|failed|error|FAILED" "$OUT/gpu_tests_kernels.log"
  [ "${2:-}" = engine ] && { timeout 300 python3 -m pytest -q -m gpu -rf -p no:cacheprovider tests/test_gpu.py \
    tests/test_sampler.py > "$OUT/gpu_tests_engine.log" 2>&1
    grep -E "passed|failed|error|FAILED|Triton compiled" "$OUT/gpu_tests_engine.log" | tail -8; }
elif [ "$step" = e2e ]; then  # 2 GPUs (~7 min): bench_e2e beside the peer and 1 GPU (no 90k/128k rows);
  # the same decode rows of the snapshot in .old/ (2 stages); then the engine's GPU tests
  e2e() { timeout "$1" python3 bench/bench_e2e.py --preset qwen3-30b-a3b --stages 2 --long "" "${@:2}" 2>&1 | quiet; }
  e2e 200 --peer .shared/hf_peer.py --peer-prefill 2048,8192 --one-gpu --out "$OUT/e2e.json" > "$OUT/e2e.log"
  [ -d .old ] && (cd .old && PYTHONPATH=$PWD e2e 120 --prefill "" --out "$OUT/e2e_old.json" > "$OUT/e2e_old.log")
  timeout 300 python3 -m pytest -q -m gpu -rf -p no:cacheprovider tests/test_gpu.py tests/test_sampler.py \
    > "$OUT/gpu_tests_engine.log" 2>&1
  grep -E "passed|failed|error|FAILED|Triton compiled" "$OUT/gpu_tests_engine.log" | tail -8
  echo "== .old"; grep "^{'what': 'decode'\|^{'what': 'throughput'" "$OUT/e2e_old.log"; tail -12 "$OUT/e2e.log"
elif [ "$step" = b1 ]; then  # 2 GPUs (~3 min): bench_spine's batch-1 decode, 2 stages and 1 GPU
  timeout 300 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b --stages 2 \
    --skip soak,sampling,balance --out "$OUT/spine_b1.json" 2>&1 | quiet > "$OUT/spine_b1.log"
  tail -14 "$OUT/spine_b1.log"
elif [ "$step" = b1one ]; then  # 1 GPU (~5 min): batch-1 decode of the whole model on one GPU (bench_spine),
  # this tree with the default PDL mode and with MOEPIPE_PDL=1, then the snapshot in .old/ (gpu_layer_ab.sh)
  sp() { timeout 150 python3 "$1" --load-format dummy --preset qwen3-30b-a3b --stages 1 \
    --skip soak,sampling,balance,plain --out "$OUT/$2.json" 2>&1 | quiet > "$OUT/$2.log"; }
  sp bench/bench_spine.py spine_b1_1gpu
  MOEPIPE_PDL=1 sp bench/bench_spine.py spine_b1_1gpu_pdl1
  [ -d .old ] && (cd .old && PYTHONPATH=$PWD sp bench/bench_spine.py spine_b1_1gpu_old)
  for f in "$OUT"/spine_b1_1gpu*.log; do echo "== $f"; grep "batch-1 decode" "$f"; done
elif [ "$step" = kern1 ]; then  # 1 GPU (~8 min): the GPU tests of the kernels, without fused-MoE's
  pt() { timeout "$1" python3 -m pytest -q -m gpu -rf -p no:cacheprovider "${@:2}"; }
  { pt 200 tests/test_linear_small.py; pt 120 tests/test_attention_kernels.py tests/test_chunking.py
    timeout 100 python3 -m pytest -q -rf -p no:cacheprovider tests/test_fused_kernels.py; } > "$OUT/gpu_tests_kern1.log" 2>&1
  grep -E "passed|failed|error|FAILED" "$OUT/gpu_tests_kern1.log"
elif [ "$step" = verify ]; then  # 1 GPU (~3 min): what dcc0270 changed (decode kernels' specialization)
  pt() { timeout "$1" python3 -m pytest -q -m gpu -rf -p no:cacheprovider "${@:2}"; }
  { pt 120 tests/test_attention_kernels.py; pt 120 tests/test_sampler.py tests/test_gpu.py -k "no_triton_compile or sample"; } \
    > "$OUT/gpu_tests_verify.log" 2>&1
  grep -E "passed|failed|FAILED|Triton compiled" "$OUT/gpu_tests_verify.log" | tail -12
elif [ "$step" = tail ]; then  # a short follow-up on the same warm machine: per-layer decode and the sampler
  CUDA_VISIBLE_DEVICES=1 timeout 100 python3 bench/bench_sampler.py --out "$OUT/sampler.json" > "$L/sampler.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 timeout 110 python3 bench/bench_decode_layer.py --skip-first-request --out "$OUT/decode_layer.json" \
    > "$L/decode_layer.log" 2>&1
  wait
  cat "$L"/decode_layer.log "$L"/sampler.log > "$OUT/tail.log"; tail -14 "$L/decode_layer.log"; tail -14 "$L/sampler.log"
elif [ "$step" = rest ]; then
  CUDA_VISIBLE_DEVICES=2 OUT=$OUT timeout 200 bash bench/gpu_4stage.sh parity > "$L/parity.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0,1 timeout 300 python3 bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b \
    --stages 2 --out "$OUT/spine.json" 2>&1 | quiet | tee "$L/spine.log" | tail -20
  wait
  tail -8 "$L/parity.log"
  timeout 240 python3 bench/bench_4stage.py --model bench/user-config.json --stages 4 --prompt-len 90000 \
    --out "$OUT/4stage_user.json" 2>&1 | quiet | tee "$L/4stage.log" | tail -20
  cat "$L"/*.log > "$OUT/rest.log"
elif [ "$step" = big ]; then  # 4 x H200 only for the 235b: 470 GB of weights
  OUT=$OUT timeout 150 bash bench/gpu_4stage.sh profile 2>&1 | quiet | tee "$L/profile.log" | tail -20
  timeout 380 python3 bench/bench_4stage.py --model qwen3-235b-a22b --stages 4 --prompt-len 90000 \
    --out "$OUT/4stage_235b.json" 2>&1 | quiet | tee "$L/235b.log" | tail -20
  cat "$L"/*.log > "$OUT/big.log"
elif [ "$step" = serve ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
  CUDA_VISIBLE_DEVICES=0,1 timeout 200 python3 bench/bench_serving.py --model qwen3-30b-a3b --stages 2 \
    --serve-args "--load-format dummy" --concurrency 1,8,64,256 --input-len 1024 --output-len 256 \
    --out "$OUT/serving.json" 2>&1 | quiet | tee "$L/serving.log" | tail -12
else
  echo "usage: bash bench/gpu_final.sh main|rest|big|serve|one|tail|rec1|rec2|rec3|check2|verify" >&2
  exit 2
fi
