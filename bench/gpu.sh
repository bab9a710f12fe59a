#!/usr/bin/env bash
# The GPU record, one suite per device call (each fits a 10-minute call on one H200; on 2+ GPUs the
# pipeline runs one stage per GPU and the GPU tests spread over them). Needs nothing outside the
# repo; the server's wheels (fastapi, uvicorn, ... for `serving` and the server tests; fetched by
# bench/fetch_wheels.sh) travel in .whl/ when the machine has no index, and are installed from there.
#   bash bench/gpu.sh tests   [pytest args]  every @pytest.mark.gpu test
#   bash bench/gpu.sh e2e                    bench_e2e beside the transformers peer (bench/hf_peer.py),
#                                            the card's ceilings (bench/ceilings.py) and, on 2+ GPUs, 1 GPU
#   bash bench/gpu.sh long                   bench_e2e's 90k and 128k rows beside the transformers peer at 90k
#   bash bench/gpu.sh load                   bench_e2e's 256 x (128 -> 1024) and 1 000 x (1024 -> 128) rows
#   bash bench/gpu.sh serving                bench_serving: 1024 in / 256 out at 1, 8, 64, 256 clients
#   bash bench/gpu.sh kernels                bench_decode_layer, bench_sampler, bench_attention
#   bash bench/gpu.sh compare REV            bench_e2e's batch-1/16 decode and 8k prefill rows of the code
#                                            of REV (a tree made here by `git archive REV --prefix=REV/ |
#                                            tar -x -C .old`, carried as .old) and of this tree, in one call:
#                                            ROUNDS (2) alternating rounds, medians and ranges
#   bash bench/gpu.sh prefix                 the prefix cache on and off: shared-prefix and plain serving, multi-turn
#   bash bench/gpu.sh breakdown [args]       bench_breakdown: the engine's decode step at batch 16, 64, 256
#                                            (1k context; 256 also with penalties), per kernel group, after
#                                            this suite's GPU tests (BD_TESTS=0: the bench alone); args go
#                                            to bench_breakdown (--penalties-fused on|off: the fused
#                                            penalties' A/B against the torch ops; --batches "" --prefill
#                                            8192,90000 --yarn: prefill of one prompt each, FLOPs floors;
#                                            --attention split: cuDNN for chunks; --moe-n-major-min-bm 0: the
#                                            M-major grouped-GEMM grid, N-major's A/B; BD_TAG=x names files)
#   bash bench/gpu.sh ablate                 bench_decode_ablate (each part's cost in a decode layer, b1/16/64) and
#                                            bench_decode_merge (the decode merge fused against launched);
#                                            ABLATE_ARGS="... --ab FIELD=VALUE" ABLATE_MERGE=0: a switch's A/B alone
#   bash bench/gpu.sh moe                    bench_moe_prefill (MoE pieces at 1k-16k tokens, tile sweep) after its tests
#                                            (MOE_TOKENS=16,64,256: at the decode steps' sizes; MOE_TESTS=0: no tests)
#   bash bench/gpu.sh rows                   the MoE's token-row / ranked forms: GPU tests, bench_moe_rows, the ranked A/B
#   bash bench/gpu.sh fa3                    bench_attention's Hopper prefill tile sweep (FA3_CASES) after its tests
#   bash bench/gpu.sh decode-sweep           bench_attention's decode splits / key steps at B=16-256 (1k) and B=1 (32k)
#   bash bench/gpu.sh serving-bound          64 clients at --max-step-ms in BOUNDS (default "0 30 45")
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
# drop load progress and the engine's own notes, keeping a late Triton compile (a request paying JIT)
quiet() { awk '!/: loaded .* of |unbatched P2P|^$/ && (!/^\[moepipe\]/ || /Triton compiled/)'; }
# -v and durations: the log names a test that hangs or crawls; a per-test timeout keeps one from taking the call
pt() { timeout "$1" python3 -m pytest -v -m gpu -rf -p no:cacheprovider --durations=15 --timeout=150 \
  --continue-on-collection-errors "${@:2}"; }
KERNEL_TESTS="tests/test_fused_moe.py tests/test_fused_kernels.py tests/test_linear_small.py tests/test_attention_kernels.py tests/test_chunking.py"
ROWS_TESTS="tests/test_moe_rows.py"  # the MoE's token-row forms at real shapes: a process of their own on one GPU
ignore() { for f in $KERNEL_TESTS $ROWS_TESTS; do printf -- "--ignore=%s " "$f"; done; }

# every GPU test at once on one GPU (Triton compiles on the host's cores, the tests' shapes are
# small): the slow real-shape MoE checks (fp64 references) in their own processes beside the other
# kernel tests and the engine's; one_gpu_tests SECONDS
one_gpu_tests() {
  for s in qwen3-235b-a22b user-config; do
    pt "$1" --timeout=$(($1 - 10)) "tests/test_fused_moe.py::test_real_shapes_on_gpu[$s]" \
      > "$OUT/gpu_tests_moe_${s}_$TAG.log" 2>&1 &
  done
  pt "$1" $KERNEL_TESTS --deselect "tests/test_fused_moe.py::test_real_shapes_on_gpu[qwen3-235b-a22b]" \
    --deselect "tests/test_fused_moe.py::test_real_shapes_on_gpu[user-config]" > "$OUT/gpu_tests_kernels_$TAG.log" 2>&1 &
  pt "$1" $ROWS_TESTS > "$OUT/gpu_tests_rows_$TAG.log" 2>&1 &
  pt "$1" tests $(ignore) > "$OUT/gpu_tests_engine_$TAG.log" 2>&1
  wait
}
# one server of the 30b config beside the project's small test tokenizer on :8123 (json_schema requests
# need a tokenizer.json; ids past its 512 are never allowed by a grammar, plain requests sample the
# whole vocabulary); serve_up LOG [engine serve flags], serve_down
serve_up() {
  python3 -c "import json, sys; from pathlib import Path; from loader.presets import preset_config
from loader.writer import write_tokenizer; d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
(d / 'config.json').write_text(json.dumps(preset_config('qwen3-30b-a3b'))); write_tokenizer(d, 512)" /tmp/q30tok
  python3 -m engine serve --model /tmp/q30tok --load-format dummy --stages "$NGPU" --host 127.0.0.1 --port 8123 \
    --quiet "${@:2}" > "$1" 2>&1 &
  srv=$!
  for _ in $(seq 240); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health', timeout=2)" 2>/dev/null && break; sleep 1; done
}
serve_down() { kill -INT $srv; for _ in $(seq 40); do kill -0 $srv 2>/dev/null || break; sleep 1; done; kill -9 $srv 2>/dev/null; }

case "$suite" in
tests)
  if [ "$NGPU" -ge 2 ]; then  # kernels on the last GPU beside the engine's tests on the others
    CUDA_VISIBLE_DEVICES=$((NGPU - 1)) pt 560 $KERNEL_TESTS $ROWS_TESTS "$@" > "$OUT/gpu_tests_kernels_$TAG.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((NGPU - 2))) pt 560 tests $(ignore) "$@" > "$OUT/gpu_tests_engine_$TAG.log" 2>&1
    wait
  else
    one_gpu_tests 420  # the engine's tests beside the two real-shape MoE checks (~215 s each) need more than 280 s
  fi
  for f in "$OUT"/gpu_tests_*_"$TAG".log; do echo "== $f"; grep -E "passed|failed|FAILED|Timeout|Triton compiled" "$f" | tail -8; done
  ;;
e2e)
  python3 bench/ceilings.py | tee "$OUT/ceilings_$TAG.jsonl"
  one=(); [ "$NGPU" -ge 2 ] && one=(--one-gpu)
  timeout 540 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --stages "$NGPU" --long "" \
    --peer bench/hf_peer.py --peer-prefill 2048,8192 "${one[@]}" --out "$OUT/e2e_$TAG.json" 2>&1 | quiet \
    > "$OUT/e2e_$TAG.log"
  tail -16 "$OUT/e2e_$TAG.log"
  ;;
load)  # issue 24's throughput workloads: 256 x (128 -> 1024) and 1,000 x (1024 -> 128), greedy
  timeout 560 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --stages "$NGPU" --prefill "" --long "" \
    --requests 16 --load 256x128x1024,1000x1024x128 --out "$OUT/load_$TAG.json" 2>&1 | quiet > "$OUT/load_$TAG.log"
  tail -10 "$OUT/load_$TAG.log"
  ;;
long)  # 90k and 128k prompts (time to first token, decode after them) beside the transformers peer at 90k
  timeout 560 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --stages "$NGPU" --prefill "" --long 90000,128000 \
    --decode-ctx 92160 --requests 16 --peer bench/hf_peer.py --peer-prefill 90000 --out "$OUT/long_$TAG.json" 2>&1 \
    | quiet > "$OUT/long_$TAG.log"
  tail -14 "$OUT/long_$TAG.log"
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
  if [ "${BD_TESTS:-1}" = 1 ]; then  # BD_TESTS=0: the bench alone
    pt 240 --timeout=230 tests/test_breakdown.py tests/test_warm_classes.py tests/test_decode_step_gpu.py \
      > "$OUT/gpu_tests_breakdown_$TAG.log" 2>&1
    grep -E "passed|failed|FAILED|Error|late" "$OUT/gpu_tests_breakdown_$TAG.log" | tail -8
  fi
  # more arguments go to bench_breakdown (--penalties-fused off, --moe-n-major-min-bm 0); BD_TAG=x names
  # the files breakdown_..._x
  sfx=${BD_TAG:+_$BD_TAG}
  timeout 330 python3 bench/bench_breakdown.py --out "$OUT/breakdown_$TAG$sfx.json" "$@" 2>&1 | quiet \
    | grep -v "^USDT\|^STAGE:" > "$OUT/breakdown_$TAG$sfx.log"
  tail -66 "$OUT/breakdown_$TAG$sfx.log"
  ;;
ablate)  # what each part of a decode layer costs, and the decode merge's A/B, in decode-layer graphs;
  # ABLATE_ARGS replaces bench_decode_ablate's arguments (--ab FIELD=VALUE: a Backend switch's A/B),
  # ABLATE_MERGE=0 leaves out bench_decode_merge, ABLATE_TAG=x names the log decode_ablate_..._x
  sfx=${ABLATE_TAG:+_$ABLATE_TAG}
  timeout 400 python3 bench/bench_decode_ablate.py ${ABLATE_ARGS:---batches 1,16,64 --contexts 256,1024} 2>&1 \
    | grep -v Warn > "$OUT/decode_ablate_$TAG$sfx.log"
  [ "${ABLATE_MERGE:-1}" = 1 ] && timeout 200 python3 bench/bench_decode_merge.py 2>&1 | grep -v Warn \
    > "$OUT/decode_merge_$TAG.log"
  tail -8 "$OUT/decode_ablate_$TAG$sfx.log"; tail -10 "$OUT/decode_merge_$TAG.log" 2>/dev/null
  ;;
moe)  # the MoE at prefill sizes (bench_moe_prefill: route, aligns, GEMMs with a tile sweep, k-term sums) after
  # the fused MoE's GPU tests
  [ "${MOE_TESTS:-1}" = 1 ] && pt 300 --timeout=280 tests/test_fused_moe.py --deselect "tests/test_fused_moe.py::test_real_shapes_on_gpu[qwen3-235b-a22b]" \
    --deselect "tests/test_fused_moe.py::test_real_shapes_on_gpu[user-config]" > "$OUT/gpu_tests_moe_prefill_$TAG.log" 2>&1
  grep -sE "passed|failed|FAILED|Timeout" "$OUT/gpu_tests_moe_prefill_$TAG.log" | tail -6
  sfx=${MOE_TOKENS:+_decode}  # MOE_TOKENS=16,64,256: the decode steps' sizes (files moe_prefill_..._decode)
  timeout 200 python3 bench/bench_moe_prefill.py --sweep --tokens "${MOE_TOKENS:-1024,2048,4096,8192,16384}" \
    --out "$OUT/moe_prefill_$TAG$sfx.json" > "$OUT/moe_prefill_$TAG$sfx.log" 2>&1
  tail -8 "$OUT/moe_prefill_$TAG$sfx.log"
  ;;
rows)  # the MoE's token-row and ranked forms (model/moe_rows_triton.py): their GPU tests, both GEMMs beside
  # align + grouped (bench_moe_rows), then decode-layer A/Bs: the ranked form (off by default until it
  # wins) and the GEMV path's threshold against the token rows
  pt 240 --timeout=200 tests/test_moe_rows.py > "$OUT/gpu_tests_rows_$TAG.log" 2>&1
  grep -E "passed|failed|FAILED|Timeout" "$OUT/gpu_tests_rows_$TAG.log" | tail -6
  timeout 150 python3 bench/bench_moe_rows.py --tokens 4,8,16,24,32,48,64 2>&1 | grep -v Warn > "$OUT/moe_rows_$TAG.log"
  timeout 200 python3 bench/bench_decode_ablate.py --batches 16,24,32,64 --contexts 256 --ab moe_ranked_max_pairs=512 \
    --rounds 2 2>&1 | grep -v Warn > "$OUT/decode_ablate_${TAG}_ranked.log"
  # the GEMV path's end (64 pairs): the token-row form from 2, 3 or 5 tokens instead (top-8)
  timeout 150 python3 bench/bench_decode_ablate.py --batches 2,4,6,8 --contexts 256 --ab moe_small_max_pairs=8 \
    --ab moe_small_max_pairs=16 --ab moe_small_max_pairs=32 --rounds 2 2>&1 | grep -v Warn \
    > "$OUT/decode_ablate_${TAG}_small_max.log"
  grep -E "^N=|ranked|align \+|PDL on  " "$OUT/moe_rows_$TAG.log" | grep -v "PDL off"; tail -4 "$OUT/decode_ablate_${TAG}_ranked.log"
  tail -4 "$OUT/decode_ablate_${TAG}_small_max.log"
  ;;
fa3)  # the Hopper prefill kernel's tile sweep (FA3_SWEEP) at the long-chunk cases, after its GPU tests
  pt 200 --timeout=190 tests/test_attention_fa3.py > "$OUT/gpu_tests_fa3_$TAG.log" 2>&1
  grep -E "passed|failed|FAILED|Timeout" "$OUT/gpu_tests_fa3_$TAG.log" | tail -6
  timeout 240 python3 bench/bench_attention.py --only prefill --sweep --cases "${FA3_CASES:-prefill 8k at 86k S64}" \
    --out "$OUT/attention_fa3_$TAG.json" > "$OUT/attention_fa3_$TAG.log" 2>&1
  grep -E "fa3|sdpa|cudnn|matmul" "$OUT/attention_fa3_$TAG.log" | tail -24
  ;;
decode-sweep)  # the decode kernel's splits and key steps at the serving step's batches (1k context) and b1 at 32k
  timeout 200 python3 bench/bench_attention.py --only decode --sweep \
    --cases "${DECODE_CASES:-decode B=16 ctx=1k,decode B=64 ctx=1k,decode B=256 ctx=1k,decode B=1 ctx=32k}" \
    --out "$OUT/attention_decode_$TAG.json" > "$OUT/attention_decode_$TAG.log" 2>&1
  grep -E "^decode|matmul" "$OUT/attention_decode_$TAG.log" | tail -60
  ;;
serving-bound)  # 64 clients, 1024 in / 256 out, one server per --max-step-ms in BOUNDS (0: off): the bound's A/B
  for ms in ${BOUNDS:-0 30 45}; do
    timeout 200 python3 bench/bench_serving.py --model qwen3-30b-a3b --stages "$NGPU" \
      --serve-args "--load-format dummy --max-step-ms $ms" --concurrency 64 --num-prompts 128 --input-len 1024 \
      --output-len 256 --out "$OUT/serving_bound${ms}_$TAG.json" 2>&1 | quiet > "$OUT/serving_bound${ms}_$TAG.log"
    echo "--max-step-ms $ms:"; tail -2 "$OUT/serving_bound${ms}_$TAG.log"
    python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['results'][0]
print({k: r.get(k) for k in ('step_cost_scale', 'step_bound_over')})" "$OUT/serving_bound${ms}_$TAG.json" 2>/dev/null
  done
  ;;
compare)  # one model, two versions of the code, one call: ROUNDS (default 2) alternating rounds, the old
  # tree first in odd rounds and second in even ones (each row's median over the rounds; one tree's own
  # spread printed beside it)
  rev=${1:?usage: bash bench/gpu.sh compare REV}
  [ -d ".old/$rev" ] || { echo "error: .old/$rev is missing: git archive $rev --prefix=$rev/ | tar -x -C .old"; exit 2; }
  e2e() { timeout 200 python3 bench/bench_e2e.py --preset qwen3-30b-a3b --stages 1 --prefill 8192 --long "" \
    --decode-ctx 8192 --requests 16 --out "$1" 2>&1 | quiet | tail -4; }
  old() { (cd ".old/$rev" && PYTHONPATH=$PWD e2e "$OLDPWD/$OUT/compare_${rev}_r$1_$TAG.json"); }
  for r in $(seq "${ROUNDS:-2}"); do
    if [ $((r % 2)) = 1 ]; then old "$r"; e2e "$OUT/compare_this_r${r}_$TAG.json"
    else e2e "$OUT/compare_this_r${r}_$TAG.json"; old "$r"; fi
  done
  python3 - "$OUT" "$TAG" "$rev" <<'PY'
import glob, json, statistics, sys
out, tag, rev = sys.argv[1:]
def pick(path):
    rows = json.load(open(path))["moepipe"]
    dec = {r["batch"]: r["ms_per_step"] for r in rows if r["what"] == "decode" and r["prompt"] == 128}
    pre = {r["tokens"]: r["tok_per_s"] for r in rows if r["what"] == "prefill"}
    return [dec.get(1), dec.get(16), pre.get(8192)]
runs = {who: [pick(f) for f in sorted(glob.glob(f"{out}/compare_{who}_r*_{tag}.json"))] for who in (rev, "this")}
print(f"{'':<22}{rev:>12}{'this tree':>12}{'new/old':>9}   rounds: {len(runs[rev])} / {len(runs['this'])}; each value's range")
for i, name in enumerate(["decode b1 ms/step", "decode b16 ms/step", "prefill 8k tok/s"]):
    col = {w: [r[i] for r in runs[w] if r[i] is not None] for w in runs}
    med = {w: statistics.median(v) if v else None for w, v in col.items()}
    a, b = med[rev], med["this"]
    span = "  ".join(f"{w} {min(v):g}-{max(v):g}" for w, v in col.items() if v)
    f = lambda v: "-" if v is None else f"{v:.0f}" if v >= 1000 else f"{v:.4g}"
    print(f"{name:<22}{f(a):>12}{f(b):>12}{(b / a if a and b else float('nan')):>9.3f}   {span}")
PY
  ;;
prefix)  # the prefix cache: the multi-turn conversation first (cache on; turn 1 computes the whole
  # prompt, what every turn costs with the cache off), then one server per setting: the plain 1024/256
  # sample at 64 clients (nothing shared), a 2,048-token shared system prompt + 256 own at 64 and 256
  # clients, and the plain sample again (two nothing-shared samples per setting: the on/off gap beside
  # the run-to-run spread)
  timeout 170 python3 bench/bench_multiturn.py --target 90000,128000 --turns 8 --cache on \
    --out "$OUT/multiturn_on_$TAG.json" 2>&1 | quiet | tee "$OUT/multiturn_on_$TAG.log" | tail -4
  for c in on off; do
    serve_up "$OUT/server_${c}_$TAG.log" $([ $c = off ] && echo --no-enable-prefix-caching)
    sp() { timeout 150 python3 bench/bench_serving.py --url http://127.0.0.1:8123 --vocab-size 151936 --output-len 256 \
      "$@" 2>&1 | quiet; }
    log="$OUT/prefix_serving_${c}_$TAG.log"  # each run's table row printed as it ends (a cut call keeps them)
    sp --concurrency 64 --num-prompts 64 --input-len 1024 --seed 3 --out "$OUT/prefix_plain64_${c}_$TAG.json" >> "$log"
    echo "cache $c, plain 1024, 64 clients:"; tail -1 "$log"
    sp --concurrency 64 --num-prompts 64 --input-len 256 --shared-prefix-tokens 2048 --seed 1 \
      --out "$OUT/prefix_shared64_${c}_$TAG.json" >> "$log"; echo "cache $c, shared 2048 + 256, 64 clients:"; tail -1 "$log"
    sp --concurrency 256 --num-prompts 256 --input-len 256 --shared-prefix-tokens 2048 --seed 2 \
      --out "$OUT/prefix_shared256_${c}_$TAG.json" >> "$log"; echo "cache $c, shared 2048 + 256, 256 clients:"; tail -1 "$log"
    sp --concurrency 64 --num-prompts 64 --input-len 1024 --seed 4 --out "$OUT/prefix_plainb64_${c}_$TAG.json" >> "$log"
    echo "cache $c, plain 1024 (second sample), 64 clients:"; tail -1 "$log"
    serve_down
  done
  python3 - "$OUT" "$TAG" <<'PY'
import json, sys
from pathlib import Path
out, tag = Path(sys.argv[1]), sys.argv[2]
print(f"{'run':<16}{'cache':>6}{'out tok/s':>11}{'TTFT p50 ms':>13}{'TPOT p50 ms':>13}")
for run in ("shared64", "shared256", "plain64", "plainb64"):
    for c in ("on", "off"):
        f = out / f"prefix_{run}_{c}_{tag}.json"
        if not f.exists():
            print(f"{run:<16}{c:>6}  (missing)"); continue
        r = json.loads(f.read_text())["results"][0]
        print(f"{run:<16}{c:>6}{r['output_throughput']:>11.0f}{r['median_ttft_ms']:>13.1f}{r['median_tpot_ms']:>13.1f}")
PY
  tail -4 "$OUT/multiturn_on_$TAG.log"
  (cd "$OUT" && tar czf "prefix_$TAG.tgz" --remove-files ./*_"$TAG".log ./*_"$TAG".json)
  ;;
record)  # the short record for a one-call budget: every GPU test, then one server, then the cache
  one_gpu_tests 280  # 1. every GPU test
  for f in "$OUT"/gpu_tests_*_"$TAG".log; do echo "== $f"; grep -E "passed|failed|FAILED|Timeout" "$f" | tail -6; done
  serve_up "$OUT/server_$TAG.log"
  sv() { timeout 120 python3 bench/bench_serving.py --url http://127.0.0.1:8123 --concurrency 64 --num-prompts 64 \
    --vocab-size 151936 --output-len 256 "$@" 2>&1 | quiet; }
  { sv --input-len 1024 --json-share 0,0.5 --out "$OUT/serving_json_$TAG.json"
    sv --input-len 1024 --mix-share 0.5 --out "$OUT/serving_mix_$TAG.json"
    sv --input-len 2304 --out "$OUT/serving_noshare_$TAG.json"
    sv --input-len 256 --shared-prefix-tokens 2048 --out "$OUT/serving_shared_$TAG.json"; } > "$OUT/serving_$TAG.log"
  serve_down
  # 3. the multi-turn conversation to 90k and 128k with the cache on; turn 1 computes the whole prompt,
  # which is what every turn costs with the cache off
  timeout 150 python3 bench/bench_multiturn.py --target 90000,128000 --turns 4 --cache on \
    --out "$OUT/multiturn_$TAG.json" 2>&1 | quiet > "$OUT/multiturn_$TAG.log"
  grep -E "^ *(c|conc|64|plain|json|mix|kind)|tok/s|TTFT|TPOT" "$OUT/serving_$TAG.log" | tail -24; tail -22 "$OUT/multiturn_$TAG.log"
  (cd "$OUT" && tar czf "record_$TAG.tgz" --remove-files ./*_"$TAG".log ./*_"$TAG".json)  # a device call returns 8 files
  ;;
*)
  echo "usage: bash bench/gpu.sh tests|e2e|long|load|serving|kernels|breakdown|moe|fa3|decode-sweep|serving-bound|compare REV|prefix|record [args]" >&2
  exit 2
  ;;
esac
