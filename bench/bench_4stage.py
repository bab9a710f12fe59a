"""Big models on several stages with dummy weights: TTFT of one long prompt, decode ms/step at batch 1
(after that prompt) and at larger batches (short prompts), per-stage busy fraction, KV pool and peak
memory, beside what `plan` predicted for the same split.

GPU (the lead's run):  python bench/bench_4stage.py --model bench/user-config.json --stages 4 \
                           --prompt-len 90000 --out bench/results/4stage_H100x4.json
CPU check:            python bench/bench_4stage.py --model tiny --device cpu --stages 4 --prompt-len 64"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM, SamplingParams  # noqa: E402
from engine.tools.plan import GIB, default_reserve_gib, stage_plan  # noqa: E402
from loader.dummy import dummy_config  # noqa: E402
from model.config import parse_dtype  # noqa: E402


def _raw_config(model: str) -> dict:
    from loader.presets import PRESETS, preset_config
    if model in PRESETS:
        return preset_config(model)
    p = Path(model)
    return json.loads((p / "config.json" if p.is_dir() else p).read_text())


def timed_stream(llm: LLM, prompts: list[list[int]], steps: int) -> dict:
    """Greedy, `steps` new tokens per prompt; time to first token of the first prompt and ms per
    decode step once every prompt has its first token."""
    sp = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    first: dict[int, float] = {}
    last = t0
    n = 0
    for i, _tok, _reason in llm.stream(prompts, sp):
        now = time.perf_counter()
        first.setdefault(i, now)
        last, n = now, n + 1
    all_first = max(first.values())
    decode = (last - all_first) * 1e3 / (steps - 1) if steps > 1 else None
    return {"prompts": len(prompts), "prompt_len": len(prompts[0]), "new_tokens": n,
            "ttft_ms": (min(first.values()) - t0) * 1e3, "all_first_ms": (all_first - t0) * 1e3,
            "decode_ms_per_step": decode, "wall_ms": (last - t0) * 1e3}


def stage_rows(stats: dict, wall_ms: float) -> list[dict]:
    out = []
    for s in stats["stages"]:
        row = {"rank": s["rank"], "layers": s["layers"], "busy_ms": s["busy_ms"],
               "busy_frac": s["busy_ms"] / wall_ms if wall_ms > 0 else None}
        for k in ("peak_gib", "kv_gib"):
            if k in s:
                row[k] = s[k]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).with_name("user-config.json")),
                    help="config.json (file or folder) or preset name; weights are random (load_format=dummy)")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--layers", default=None, help="layers per stage, e.g. 12,12,12,12, or auto (default: even)")
    ap.add_argument("--prompt-len", type=int, default=90000, help="the long prompt (TTFT, then batch-1 decode)")
    ap.add_argument("--short-len", type=int, default=256, help="prompt length of the batched decode runs")
    ap.add_argument("--steps", type=int, default=32, help="new tokens per request")
    ap.add_argument("--batches", default="1,16", help="batch sizes of the short-prompt decode runs")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--yarn", type=float, default=None, metavar="FACTOR",
                    help="add YaRN rope_scaling of this factor over the config's max_position_embeddings "
                         "(as Qwen's model cards do for long contexts, e.g. 4 for the 235b preset at 90k)")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args(argv)

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(a.dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    raw = _raw_config(a.model)
    if a.yarn:
        orig = raw["max_position_embeddings"]
        raw.update(rope_scaling={"rope_type": "yarn", "factor": a.yarn, "original_max_position_embeddings": orig},
                   max_position_embeddings=int(orig * a.yarn))
    folder = Path(tempfile.mkdtemp(prefix="bench4-"))  # dummy weights of this config.json, no files read
    (folder / "config.json").write_text(json.dumps(raw))
    cfg = dummy_config(str(folder))
    batches = [int(x) for x in a.batches.split(",") if x.strip()]
    max_len = max(a.prompt_len, a.short_len) + a.steps + 16
    layers = None if a.layers in (None, "auto") else [int(x) for x in a.layers.split(",")]

    t_load = time.perf_counter()
    llm = LLM(str(folder), stages=a.stages, device=device, dtype=str(dtype).removeprefix("torch."),
              layers="auto" if a.layers == "auto" else layers, load_format="dummy", max_model_len=max_len,
              gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.enforce_eager)
    load_s = time.perf_counter() - t_load
    with llm:
        # queried once the stages hold their memory (this process's CUDA context comes after their sizing)
        card_gib = torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else 80.0
        counts = [s["layers"][1] - s["layers"][0] for s in llm.stats()["stages"]]
        plan = stage_plan(cfg, a.stages, max_len, card_gib * a.gpu_memory_utilization, dtype, counts)
        g = torch.Generator().manual_seed(0)
        V = cfg.vocab_size

        def prompts(n: int, length: int) -> list[list[int]]:
            return [torch.randint(0, V, (length,), generator=g).tolist() for _ in range(n)]

        llm.generate(prompts(1, 16), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
        llm.stats(reset=True)
        runs = []
        long = timed_stream(llm, prompts(1, a.prompt_len), a.steps)
        long["name"] = f"prompt {a.prompt_len}, batch 1"
        long["stages"] = stage_rows(llm.stats(reset=True), long["wall_ms"])
        runs.append(long)
        print("run:", json.dumps(long), flush=True)  # a time limit still leaves what was measured
        for B in batches:
            r = timed_stream(llm, prompts(B, a.short_len), a.steps)
            r["name"] = f"prompt {a.short_len}, batch {B}"
            r["stages"] = stage_rows(llm.stats(reset=True), r["wall_ms"])
            runs.append(r)
            print("run:", json.dumps(r), flush=True)
        sched = llm.stats()["scheduler"]

    pool_tokens = sched.get("num_blocks", 0) * llm.options.block_size
    reserve = default_reserve_gib(cfg)
    predicted = []
    for row in plan.per_stage:
        kv_pool_gib = pool_tokens * row.kv_bytes_per_token / GIB
        peak = max((st.get("peak_gib", 0.0) for r in runs for st in r["stages"] if st["rank"] == row.rank), default=0.0)
        predicted.append({"rank": row.rank, "layers": [row.start, row.end], "weights_gib": row.weight_bytes / GIB,
                          "plan_kv_tokens": row.tokens, "kv_pool_gib": kv_pool_gib,
                          "plan_peak_gib": row.weight_bytes / GIB + kv_pool_gib + (reserve - 2.0),
                          "measured_peak_gib": peak if device == "cuda" else None})  # CPU: process RSS, not comparable
    result = {"model": a.model, "yarn": a.yarn, "device": device, "dtype": str(dtype).removeprefix("torch."),
              "card": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "stages": a.stages,
              "layers": counts, "load_s": load_s, "max_model_len": max_len, "pool_tokens": pool_tokens,
              "plan": {"tokens": plan.tokens, "fits": plan.fits, "verdict": plan.verdict,
                       "card_gib_used": card_gib * a.gpu_memory_utilization},
              "per_stage_memory": predicted, "runs": runs}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    print(f"{r['model']} on {r['stages']} x {r['card']} ({r['dtype']}), layers {r['layers']}, "
          f"KV pool {r['pool_tokens']} tokens (plan: {r['plan']['tokens']})")
    print(f"{'run':<26} {'TTFT ms':>10} {'decode ms/step':>15}  busy % per stage")
    for run in r["runs"]:
        dec = f"{run['decode_ms_per_step']:.2f}" if run["decode_ms_per_step"] is not None else "-"
        busy = " ".join(f"{100 * s['busy_frac']:5.1f}" for s in run["stages"])
        print(f"{run['name']:<26} {run['ttft_ms']:>10.1f} {dec:>15}  {busy}")
    print(f"{'stage':>5} {'layers':>9} {'weights GiB':>12} {'KV GiB':>8} {'plan peak':>10} {'measured':>9}")
    for m in r["per_stage_memory"]:
        meas = f"{m['measured_peak_gib']:.2f}" if m["measured_peak_gib"] else "-"
        print(f"{m['rank']:>5} {m['layers'][0]:>4}-{m['layers'][1] - 1:<4} {m['weights_gib']:>12.2f} "
              f"{m['kv_pool_gib']:>8.2f} {m['plan_peak_gib']:>10.2f} {meas:>9}")


if __name__ == "__main__":
    sys.exit(main())
