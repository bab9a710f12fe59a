"""The engine's spine (issue 7), measured end to end:

1. sampling vs greedy: output tok/s of 256 x (128 -> 128), greedy against temperature 0.8 / top-p 0.9;
2. stage balance: each stage's busy share of the wall time for 64 x (1024 prompt + 64 new);
3. batch-1 decode ms/step on N stages against the whole model on 1 GPU (same kernels);
4. soak: 1,000 requests of mixed lengths and sampling parameters in waves, 10% abandoned midway,
   some refused, a KV pool small enough to preempt: wall time, tokens, preemptions, pool free at
   the end, and the greedy ones re-run alone must match.

    python bench/bench_spine.py --load-format dummy --preset qwen3-30b-a3b --stages 2 --out r.json
    python bench/bench_spine.py --model DIR --stages 2 --out r.json
Prints a table, writes JSON to --out. --small shrinks every workload (a CPU smoke run)."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 1, (length,), generator=g).tolist() for _ in range(n)]


def _timed_generate(llm: LLM, prompts, sp) -> tuple[float, int, dict]:
    llm.stats(reset=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t0
    return wall, sum(len(o.token_ids) for o in outs), llm.stats(reset=True)


def sampling_vs_greedy(llm: LLM, n: int, plen: int, new: int, rounds: int = 3, trace: str | None = None) -> dict:
    """Greedy and sampled runs alternate for `rounds` rounds; each side's figure is its median, so
    a slow first run (or a drifting clock) weighs on neither side alone. With `trace`, the second
    round's runs also write a timeline each (TRACE.greedy.json, TRACE.sampled.json)."""
    V = llm.config.vocab_size
    prompts = _prompts(n, plen, V, 1)
    modes = {"greedy": SamplingParams(max_tokens=new, temperature=0, ignore_eos=True),
             "sampled": SamplingParams(max_tokens=new, temperature=0.8, top_p=0.9, ignore_eos=True)}
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, ignore_eos=True))  # warm-up
    out: dict = {"workload": f"{n} x ({plen} -> {new})", "rounds": []}
    for r in range(rounds):
        row = {}
        for name, sp in modes.items():
            traced = trace is not None and r == 1
            if traced:
                llm.start_profile()
            wall, toks, st = _timed_generate(llm, prompts, sp)
            row[name] = {"wall_s": wall, "output_tok_s": toks / wall,
                         "sample_ms": [s.get("sample_ms") for s in st["stages"] if "sample_ms" in s][0],
                         "busy_ms": [s["busy_ms"] for s in st["stages"]],
                         "late_compiles": [s.get("late_compiles", 0) for s in st["stages"]]}
            if traced:
                row[name]["bubble"] = llm.stop_profile(f"{trace}.{name}.json")["bubble"]
        out["rounds"].append(row)
    for name in modes:
        walls = sorted(x[name]["wall_s"] for x in out["rounds"])
        med = walls[len(walls) // 2]
        out[name] = {"wall_s_median": med, "output_tok_s": n * new / med, "wall_s_all": [x[name]["wall_s"] for x in out["rounds"]]}
    out["sampled_vs_greedy"] = out["sampled"]["output_tok_s"] / out["greedy"]["output_tok_s"]
    return out


def stage_balance(llm: LLM, n: int, plen: int, new: int) -> dict:
    prompts = _prompts(n, plen, llm.config.vocab_size, 2)
    wall, toks, st = _timed_generate(llm, prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    return {"workload": f"{n} x ({plen} + {new})", "wall_s": wall,
            "stages": [{"rank": s["rank"], "layers": s["layers"], "busy_ms": s["busy_ms"],
                        "busy_pct": 100 * s["busy_ms"] / (wall * 1e3), "sample_ms": s.get("sample_ms")}
                       for s in st["stages"]]}


def decode_ms_per_step(llm: LLM, new: int) -> dict:
    """Batch-1 decode: the time between the first and the last streamed token over their count."""
    prompt = _prompts(1, 16, llm.config.vocab_size, 3)[0]
    sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    list(llm.stream([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))  # warm-up
    best = None
    for _ in range(3):
        stamps = [time.perf_counter() for _ in llm.stream([prompt], sp)]
        ms = (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)
        best = ms if best is None else min(best, ms)
    return {"tokens": new, "ms_per_step": best}


def soak(llm: LLM, n: int, waves: int, max_prompt: int, max_new: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    V = llm.config.vocab_size
    pool_tokens = llm.info["num_blocks"] * llm.info["block_size"]
    reqs = []
    for i in range(n):
        if i % 10 == 3:
            reqs.append(("abandon", rng.randint(1, max_prompt), SamplingParams(max_tokens=max_new, temperature=0,
                                                                               ignore_eos=True)))
        elif i % 41 == 5:
            reqs.append(("refuse", min(pool_tokens, llm.max_model_len) + 1, SamplingParams(max_tokens=8)))
        elif rng.random() < 0.5:
            reqs.append(("greedy", rng.randint(1, max_prompt), SamplingParams(
                max_tokens=rng.randint(1, max_new), temperature=0, ignore_eos=True)))
        else:
            reqs.append(("sampled", rng.randint(1, max_prompt), SamplingParams(
                max_tokens=rng.randint(1, max_new), temperature=rng.choice([0.6, 1.0]), top_k=rng.choice([0, 50]),
                top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]),
                seed=rng.choice([None, rng.randint(0, 2**31)]), ignore_eos=True)))
    prompts = [[rng.randint(3, V - 1) for _ in range(k)] for _, k, _ in reqs]
    llm.stats(reset=True)
    got, refused, abandoned, t0 = {}, 0, 0, time.perf_counter()
    per = -(-n // waves)
    for w in range(waves):
        streams = {}
        for i in range(w * per, min(n, (w + 1) * per)):
            kind, _, sp = reqs[i]
            try:
                streams[i] = llm.submit(prompts[i], sp)
            except ValueError:
                refused += 1
                assert kind == "refuse"
        for i in list(streams):
            s = streams.pop(i)
            if reqs[i][0] == "abandon":
                next(s)
                s.close() if i % 2 else llm.abort([s.request_id])
                abandoned += 1
                continue
            got[i] = [ev.token_id for ev in s]
            assert 1 <= len(got[i]) <= reqs[i][2].max_tokens
        gc.collect()
    wall = time.perf_counter() - t0
    deadline = time.monotonic() + 30
    while True:
        st = llm.stats()
        sch = st["scheduler"]
        if (sch["running"], sch["waiting"]) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    greedy = [i for i in got if reqs[i][0] == "greedy"][:20]
    alone = [llm.generate([prompts[i]], reqs[i][2])[0].token_ids for i in greedy]
    same = sum(a == got[i] for a, i in zip(alone, greedy))
    # a mismatch is told apart from a control-plane fault (a wrong or lost event) by what it does:
    # re-run alone again (deterministic?), and with 7 neighbours (does the batch alone change it?);
    # each gives the first index where it departs from the first alone run
    diverged = []
    for a, i in zip(alone, greedy):
        if a == got[i]:
            continue
        again = llm.generate([prompts[i]], reqs[i][2])[0].token_ids
        others = [prompts[j] for j in greedy if j != i][:7]
        batched = llm.generate([prompts[i]] + others, reqs[i][2])[0].token_ids
        diverged.append({"request": i, "prompt_len": len(prompts[i]), "tokens": len(a),
                         "soak_first_diff": _first_diff(a, got[i]), "alone_again_first_diff": _first_diff(a, again),
                         "batch8_first_diff": _first_diff(a, batched)})
    return {"requests": n, "waves": waves, "wall_s": wall, "finished": len(got), "refused": refused,
            "abandoned": abandoned, "output_tokens": sum(len(t) for t in got.values()),
            "preemptions": sch["preemptions"], "free_blocks": sch["free_blocks"], "num_blocks": sch["num_blocks"],
            "pool_free_at_end": sch["free_blocks"] == sch["num_blocks"] and sch["running"] == 0,
            "greedy_rerun_alone_identical": f"{same}/{len(greedy)}", "diverged": diverged}


def _first_diff(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (None: equal)."""
    if a == b:
        return None
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (or hub id)")
    ap.add_argument("--preset", help="with --load-format dummy: a preset name instead of --model")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--soak-kv-gib", type=float, default=0.25, help="KV pool per stage of the soak (small: preempts)")
    ap.add_argument("--soak-prompt", type=int, default=512, help="longest soak prompt")
    ap.add_argument("--soak-new", type=int, default=64, help="most new tokens of a soak request")
    ap.add_argument("--skip", default="", help="comma list of: sampling,balance,decode,single,plain,soak")
    ap.add_argument("--small", action="store_true", help="tiny workloads (CPU smoke run)")
    ap.add_argument("--trace", default=None, help="timelines of the sampling section's second round: TRACE.greedy.json, ...")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model = a.model or a.preset
    if model is None:
        ap.error("give --model DIR, or --load-format dummy --preset NAME")
    skip = set(filter(None, a.skip.split(",")))
    kw = dict(load_format=a.load_format, verbose=False, device=a.device)
    s = 8 if a.small else 1
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "model": model, "load_format": a.load_format, "stages": a.stages,
           "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpus": torch.cuda.device_count()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a timeout keeps what was measured
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")

    with LLM(model, stages=a.stages, **kw) as llm:
        if "sampling" not in skip:
            res["sampling"] = sampling_vs_greedy(llm, 256 // s, 128 // s, 128 // s, trace=a.trace)
            save()
        if "balance" not in skip:
            res["balance"] = stage_balance(llm, 64 // s, 1024 // s, 64 // s)
            save()
        if "decode" not in skip:
            res["decode_stages"] = decode_ms_per_step(llm, 256 // s)
            save()
    if "single" not in skip and a.stages > 1:
        with LLM(model, stages=1, **kw) as llm:
            res["decode_1gpu"] = decode_ms_per_step(llm, 256 // s)
            save()
    if "plain" not in skip:  # the same batch-1 decode without async scheduling (the id waits on the host)
        for n, key in ((a.stages, "decode_stages_plain"), (1, "decode_1gpu_plain")):
            with LLM(model, stages=n, async_scheduling=False, **kw) as llm:
                res[key] = decode_ms_per_step(llm, 256 // s)
                save()
    if "soak" not in skip:
        kv = None if a.small else a.soak_kv_gib
        with LLM(model, stages=a.stages, kv_cache_gib=kv, max_num_seqs=64, **kw) as llm:
            res["soak"] = soak(llm, 1000 // s // (2 if a.small else 1), 10, a.soak_prompt // s, a.soak_new // s)
            save()
    save()
    print(f"\n{res['card']} x{res['gpus']}, {model} ({a.load_format}), {a.stages} stages, {res['date']}")
    print(f"{'figure':<44} {'value':>30}")
    if "sampling" in res:
        r = res["sampling"]
        walls = lambda k: ", ".join(f"{w:.2f}" for w in r[k]["wall_s_all"])  # noqa: E731
        print(f"{'greedy ' + r['workload']:<44} {r['greedy']['output_tok_s']:>24.0f} tok/s  (runs {walls('greedy')} s)")
        print(f"{'temp 0.8 / top-p 0.9':<44} {r['sampled']['output_tok_s']:>24.0f} tok/s  (runs {walls('sampled')} s)")
        print(f"{'sampled / greedy':<44} {r['sampled_vs_greedy']:>30.3f}")
        late = [sum(x[k]["late_compiles"]) for x in r["rounds"] for k in ("greedy", "sampled")]
        print(f"{'  Triton compiles since start-up, per run':<44} {', '.join(map(str, late)):>30}")
    if "balance" in res:
        r = res["balance"]
        busy = ", ".join(f"s{s['rank']} {s['busy_pct']:.0f}%" for s in r["stages"])
        print(f"{'busy share ' + r['workload']:<44} {busy:>30}")
    if "decode_stages" in res:
        print(f"{f'batch-1 decode, {a.stages} stages':<44} {res['decode_stages']['ms_per_step']:>24.2f} ms/step")
    if "decode_1gpu" in res:
        d = res["decode_stages"]["ms_per_step"] - res["decode_1gpu"]["ms_per_step"] if "decode_stages" in res else 0
        print(f"{'batch-1 decode, 1 GPU':<44} {res['decode_1gpu']['ms_per_step']:>24.2f} ms/step")
        print(f"{'  hop cost per step':<44} {d:>24.2f} ms")
    if "decode_1gpu_plain" in res:
        p2, p1 = res["decode_stages_plain"]["ms_per_step"], res["decode_1gpu_plain"]["ms_per_step"]
        print(f"{f'without async scheduling: {a.stages} stages / 1 GPU':<44} {p2:>13.2f} / {p1:.2f} ms/step")
        print(f"{'  hop cost per step without it':<44} {p2 - p1:>24.2f} ms")
    if "soak" in res:
        r = res["soak"]
        print(f"{'soak ' + str(r['requests']) + ' requests':<44} {r['wall_s']:>26.1f} s")
        print(f"{'  finished/refused/abandoned':<44} {r['finished']:>18}/{r['refused']}/{r['abandoned']}")
        print(f"{'  preemptions, pool free at end':<44} {r['preemptions']:>24}, {r['pool_free_at_end']}")
        print(f"{'  greedy re-run alone identical':<44} {r['greedy_rerun_alone_identical']:>30}")
        for d in r["diverged"]:
            print(f"    request {d['request']} ({d['prompt_len']} + {d['tokens']}): first differs at soak "
                  f"{d['soak_first_diff']}, alone again {d['alone_again_first_diff']}, in a batch of 8 "
                  f"{d['batch8_first_diff']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
