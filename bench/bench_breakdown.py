"""Per-step breakdown of decode inside the engine: batch 16, 64 and 256 at a ~1k context (30B-A3B
shape, dummy weights, one GPU), every kernel group's time per step, its share of the bytes floor and
the host time between steps; with --prefill, the same for the prefill of one fresh prompt of each
length given (ms per prompt, FLOPs floors at the measured matmul rate).

    python bench/bench_breakdown.py                        (bench/gpu.sh breakdown runs this)
    python bench/bench_breakdown.py --batches "" --prefill 8192,90000 --yarn    (prefill only)
    python bench/bench_breakdown.py --model tiny --batches 2,4 --context 32 --penalties-at 4   (CPU)

It builds rank 0 of a one-stage engine in this process (engine/runtime/launch.build_rank: the same
load, KV sizing, kernel warm-up and decode graphs as a served engine) and drives its PipelineEngine
with `step()`, exactly the loop the worker runs: scheduling, the step plan, the graph replay (eager
on CPU), the sampler, the host read-back. For each batch size it adds B prompts of --context random
tokens, steps until every sequence decodes, steps --warm more, then profiles --steps engine steps
with torch.profiler (CUDA: kernels, memcpys, launches; CPU: ops with their Python stacks). The only
instrumentation is two record_function labels around the stage's forward and sampler (StageWorker.
forward / .sample, wrapped on the instance), which tie the sampler's kernels to it.

Per step: group ms (bench/breakdown.py says how kernels are grouped), % of the step, the group's
bytes floor (weights read once, for the MoE the experts a uniform router is expected to touch; KV of
the actual contexts; the passes over the logits the decode path makes) at the measured copy
bandwidth, and host = step wall time - device busy (the union of device activity). Prints one table
per run, then one line per run; JSON to --out."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from breakdown import (floor_bytes, floor_flops, format_table, from_chrome_trace, from_cpu_events, summary,  # noqa: E402
                       table, top_kernels)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def build_engine(model: str, device: str | None, max_batch: int, context: int, extra_tokens: int, kv_cache_gib,
                 attention: str | None = None):
    from engine.options import EngineOptions
    from engine.runtime.launch import build_rank, resolve_engine
    # max_step_ms off: the prompts are prefilled in full-budget chunks, so the first sequences have
    # decoded only a few tokens when the last prompt is in (the measured steps are pure decode)
    opts = EngineOptions(load_format="dummy", device=device, max_num_seqs=max_batch, enable_prefix_caching=False,
                         max_model_len=context + extra_tokens, kv_cache_gib=kv_cache_gib, verbose=True,
                         max_step_ms=0.0, attention=attention)
    args, cfg, _ = resolve_engine(model, opts)
    if args.options.device == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    return build_rank(args, 0, 0), cfg


def label(name: str, fn):
    """fn run inside a record_function range `name` (the trace ties the kernels it launches to it)."""
    def wrapped(*a, **k):
        with torch.profiler.record_function(name):
            return fn(*a, **k)
    return wrapped


def median_seconds(fn, device: torch.device, runs: int = 6) -> float:
    """Median wall time of fn() over runs, the device drained before and after each."""
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Measured read + write bandwidth of a large device copy, GB/s."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n / median_seconds(lambda: y.copy_(x), device) / 1e9


def profiled(device: torch.device, run, steps: int, head_gemms: int | None = None):
    """(run()'s return, Measured) with run() under torch.profiler: kernels by group from the
    kineto trace on CUDA, ops with their Python stacks on CPU. run returns the window's wall ms."""
    cuda = device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts, with_stack=not cuda) as prof:
        wall_ms = run()
    if not cuda:
        return wall_ms, from_cpu_events(prof.events(), steps, wall_ms)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return wall_ms, from_chrome_trace(events, steps, wall_ms, head_gemms)


def sampling_params(kind: str, max_tokens: int):
    from engine.params import SamplingParams
    if kind == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if kind == "penalties":  # sampled with top-p and all three penalties: the sampler's heaviest plain path
        return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, repetition_penalty=1.1,
                              frequency_penalty=0.2, presence_penalty=0.2, ignore_eos=True)
    raise ValueError(f"--sampling {kind!r}: expected greedy or penalties")


def measure(rank, cfg, batch: int, context: int, steps: int, warm: int, sampling: str, first_id: int,
            budget: int) -> dict:
    """Profile `steps` decode steps of `batch` sequences at ~`context` tokens; returns the JSON row."""
    engine, worker = rank.engine, rank.worker
    device = worker.device
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(first_id)
    max_tokens = -(-batch * context // budget) + warm + 2 * steps + 8
    sids = list(range(first_id, first_id + batch))
    for sid in sids:
        prompt = torch.randint(10, cfg.vocab_size, (context,), generator=g).tolist()
        engine.add(sid, prompt, sampling_params(sampling, max_tokens))
    sched = engine.scheduler
    while sched.waiting or any(s.num_scheduled < s.prompt_len or not s.output_ids for s in sched.running):
        engine.step()
    for _ in range(warm):
        engine.step()
    if len(sched.running) != batch:
        raise RuntimeError(f"batch {batch}: only {len(sched.running)} sequences decoding (KV pool too small?)")
    rows_seen, dispatch = [], engine._dispatch  # the rows of each micro-batch the measured steps run

    def counted(mb):
        rows_seen.append(len(mb.chunks))
        return dispatch(mb)
    engine._dispatch = counted
    t0 = time.perf_counter()  # the same steps without the profiler (its per-op cost is host time)
    for _ in range(steps):
        engine.step()
    plain_ms = (time.perf_counter() - t0) * 1e3 / steps
    mean_ctx = sum(len(s) for s in sched.running) / batch + steps / 2

    def window() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall_ms = (time.perf_counter() - t0) * 1e3
        if cuda:
            torch.cuda.synchronize(device)
        return wall_ms
    _, m = profiled(device, window, steps)
    engine._dispatch = dispatch
    engine.abort(sids)
    while engine.has_work:
        engine.step()
    wbytes = worker.stage.dtype.itemsize
    bw = copy_bandwidth_gbs(device)
    rows = table(m, floor_bytes(cfg, batch, mean_ctx, wbytes), bw)
    step_ms = m.wall_ms / m.steps
    overlap = (sum(m.group_ms.values()) - m.busy_ms) / m.steps
    return {"batch": batch, "context": mean_ctx, "sampling": sampling, "steps": steps, "step_ms": step_ms,
            "step_ms_unprofiled": plain_ms,
            "busy_ms": m.busy_ms / m.steps, "overlap_ms": overlap, "copy_gbs": bw, "rows": rows,
            "rows_per_micro_batch": sorted(set(rows_seen)),
            "late_compiles": worker.late.stats()["late_compiles"], "late_kernels": worker.late.stats()["late_kernels"],
            "top_other": top_kernels(m, "other"), "top_copies": top_kernels(m, "copies", 4)}


def matmul_tflops(device: torch.device) -> float:
    """Measured bf16 matmul rate (fp32 on CPU) of a large square GEMM, TFLOP/s."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    return 2 * n ** 3 / median_seconds(lambda: a @ a, device) / 1e12


def measure_prefill(rank, cfg, tokens: int, first_id: int) -> dict:
    """Profile the prefill of one fresh prompt of `tokens` (max_tokens 1: its steps end with the
    first token) after an unprofiled one of the same length; ms per prompt by group, FLOPs floors
    at the measured matmul rate (breakdown.floor_flops)."""
    from engine.params import SamplingParams
    engine, worker = rank.engine, rank.worker
    device = worker.device
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(first_id)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    steps, dispatch = [], engine._dispatch

    def counted(mb):
        steps.append(sum(c.length for c in mb.chunks))
        return dispatch(mb)

    def run(sid: int) -> float:
        engine.add(sid, torch.randint(10, cfg.vocab_size, (tokens,), generator=g).tolist(), sp)
        t0 = time.perf_counter()
        while engine.has_work:
            engine.step()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3
    plain_ms = run(first_id)
    engine._dispatch = counted
    wall_ms, m = profiled(device, lambda: run(first_id + 1), 1, head_gemms=0)
    engine._dispatch = dispatch
    tflops = matmul_tflops(device)
    rows = table(m, floor_flops(cfg, [tokens]), 0.0, per_ms=tflops * 1e9)
    return {"what": "prefill", "tokens": tokens, "steps": len(steps), "step_tokens": steps, "ms": wall_ms,
            "ms_unprofiled": plain_ms, "tok_per_s": tokens / wall_ms * 1e3, "busy_ms": m.busy_ms,
            "overlap_ms": sum(m.group_ms.values()) - m.busy_ms, "matmul_tflops": tflops, "rows": rows,
            "late_compiles": worker.late.stats()["late_compiles"], "top_other": top_kernels(m, "other"),
            "top_copies": top_kernels(m, "copies", 4)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-30b-a3b", help="preset or config.json (dummy weights)")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--batches", type=ints, default=[16, 64, 256])
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="profiled engine steps per batch")
    p.add_argument("--warm", type=int, default=5, help="decode steps before the profiled ones")
    p.add_argument("--penalties-at", type=ints, default=[256],
                   help="batch sizes also run sampled with top-p and repetition/frequency/presence penalties")
    p.add_argument("--prefill", type=ints, default=[],
                   help="prompt lengths whose prefill is profiled, one fresh prompt each (ms per prompt, FLOPs floors)")
    p.add_argument("--attention", default=None, help="the engine's attention backend (default: auto on CUDA)")
    p.add_argument("--yarn", action="store_true", help="the preset with Qwen's YaRN override (131 072 positions)")
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--moe-n-major-min-bm", type=int, default=None,
                   help="model.backend.MOE_N_MAJOR_MIN_BM for this run (grouped MoE row tiles from which the grid is N-major; 0: off)")
    p.add_argument("--penalties-fused", choices=("on", "off"), default=None,
                   help="model.backend.PENALTIES_FUSED for this run (penalties in one Triton launch; default: the backend's)")
    p.add_argument("--out", default=None, help="JSON results")
    a = p.parse_args(argv)
    if a.penalties_fused is not None:
        import model.backend
        model.backend.PENALTIES_FUSED = a.penalties_fused == "on"
    if a.moe_n_major_min_bm is not None:
        import model.backend
        model.backend.MOE_N_MAJOR_MIN_BM = max(0, a.moe_n_major_min_bm)
    from engine.options import EngineOptions
    budget = EngineOptions().max_num_batched_tokens  # the engine's default step budget
    extra = -(-max(a.batches, default=1) * a.context // budget) + a.warm + 2 * a.steps + 64
    extra = max(extra, max(a.prefill, default=0) + 8 - a.context)
    model_arg = a.model
    if a.yarn:
        from loader.presets import preset_config, yarn_config
        d = Path(tempfile.mkdtemp())
        (d / "config.json").write_text(json.dumps(yarn_config(preset_config(a.model))))
        model_arg = str(d / "config.json")
    rank, cfg = build_engine(model_arg, a.device, max(a.batches, default=1), a.context, extra, a.kv_cache_gib,
                             a.attention)
    w = rank.worker
    w.forward, w.sample = label("bd.forward", w.forward), label("bd.sample", w.sample)
    results, first = [], 0
    runs = [("greedy", b) for b in a.batches] + [("penalties", b) for b in a.penalties_at if b <= max(a.batches, default=0)]
    for kind, b in runs:
        r = measure(rank, cfg, b, a.context, a.steps, a.warm, kind, first, budget)
        first += b
        results.append(r)
        print(json.dumps(r), flush=True)
    pre = [measure_prefill(rank, cfg, t, 10**6 + 2 * i) for i, t in enumerate(a.prefill)]
    for r in pre:
        print(json.dumps(r), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"model": a.model, "device": str(w.device),
                                           "penalties_fused": w.stage.backend.penalties_fused,
                                           "moe_n_major_min_bm": w.stage.backend.moe_n_major_min_bm,
                                           "attention": w.stage.backend.attention,
                                           "results": results, "prefill": pre}, indent=1))
    for r in results:
        print(f"\n[{r['sampling']}, context {r['context']:.0f}, unprofiled step {r['step_ms_unprofiled']:.3f} ms, "
              f"copy bandwidth {r['copy_gbs']:.0f} GB/s, micro-batch rows {r['rows_per_micro_batch']}, "
              f"late compiles {r['late_compiles']}: {r['late_kernels']}]")
        print(format_table(r["batch"], r["rows"], r["step_ms"], r["overlap_ms"]))
        for group in ("other", "copies"):
            for t in r.get("top_" + group, []):
                print(f"  {group:<7}{t['ms']:>8.3f} ms  {t['kernel']}")
    for r in pre:
        print(f"\n[prefill of {r['tokens']} tokens in {r['steps']} steps {r['step_tokens'][:4]}..., unprofiled "
              f"{r['ms_unprofiled']:.1f} ms, matmul {r['matmul_tflops']:.3g} TFLOP/s, late compiles {r['late_compiles']}]")
        print(format_table(1, r["rows"], r["ms"], r["overlap_ms"],
                           title=f"prefill {r['tokens']}: {r['ms']:.1f} ms ({r['tok_per_s']:.0f} tok/s; "
                                 f"kernels overlapping {r['overlap_ms']:.1f} ms); floors: FLOPs at the matmul rate"))
        for group in ("other", "copies"):
            for t in r.get("top_" + group, []):
                print(f"  {group:<7}{t['ms']:>8.3f} ms  {t['kernel']}")
    if results:
        print("\nms per step (profiled; 'outside': the step minus attention, MoE, dense and norms)")
        print(summary(results))
    return results + pre


if __name__ == "__main__":
    main()
