"""sample() on CUDA at the real vocabulary: greedy against temperature 0.8 with top-p 0.9, top-k 50
and min-p 0.05 (+ top-p 0.9), the torch path (filter_logits' sort + the fused draw) against the
filtering kernel (model/sampler_triton.py), timed by CUDA events (median of --iters). Then the
last stage's whole sampling step (engine/runtime/stage_sampling.py, from a real plan) at 16/64/256 rows:
plain top-p against penalties, logprobs (raw and processed) and logit_bias rows.

    python bench/bench_sampler.py --out sampler.json
Prints a table, writes JSON to --out."""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

MODES = {  # (temperature, top_k, top_p, min_p)
    "greedy": (0.0, 0, 1.0, 0.0),
    "top_p0.9": (0.8, 0, 0.9, 0.0),
    "top_k50": (0.8, 50, 1.0, 0.0),
    "min_p0.05+top_p0.9": (0.8, 0, 0.9, 0.05),
    "top_k50+top_p0.9": (0.8, 50, 0.9, 0.0),
}


def _time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def torch_path(logits, rows, flags):
    """The sampler's torch path: filter_logits on the device, then the draw in torch."""
    from model import sampler
    greedy = torch.argmax(logits, -1)
    if not flags & sampler.F_SAMPLED:
        return greedy
    temp = rows[:, 0].view(torch.float32)
    x = logits.float() / torch.where(temp > 0, temp, 1.0)[:, None]
    if flags & sampler.F_FILTERED:
        x = sampler.filter_logits(x, rows[:, 1], rows[:, 2].view(torch.float32), rows[:, 3].view(torch.float32))
    return torch.where(temp > 0, sampler.gumbel_draw(x, rows), greedy)


EXTRAS = {  # SamplingParams fields over temperature 0.8, top-p 0.9
    "plain": {},
    "penalties": dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1),
    "logprobs5": dict(logprobs=5),
    "logprobs5_processed": dict(logprobs=5, logprobs_mode="processed_logprobs"),
    "bias300": dict(logit_bias={t: 1.0 for t in range(0, 3000, 10)}),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, logprobs=5),
}


def extras_rows(V: int, iters: int, rows_list: tuple[int, ...] = (16, 64, 256)) -> list[dict]:
    """The last stage's sampling step on a decode plan whose rows all ask for one EXTRAS entry
    (penalty slots filled from 1000-token prompts and 200 outputs first, outside the timing)."""
    from types import SimpleNamespace

    from engine.params import SamplingParams
    from engine.runtime.sampling_plan import SamplingPlanner
    from engine.runtime.sequence import Sequence, Status
    from engine.runtime.stage_sampling import LastStageSampler
    from engine.runtime.step_plan import PlanView, build_plan
    out = []
    for R in rows_list:
        g = torch.Generator().manual_seed(R)
        logits = (torch.randn(R, V, generator=g) * 2).bfloat16().float().cuda()
        for mode, kw in EXTRAS.items():
            sp = SamplingParams(max_tokens=4096, temperature=0.8, top_p=0.9, seed=1, **kw)
            seqs = []
            for i in range(R):
                s = Sequence(i, torch.randint(0, V, (1000,), generator=g).tolist(), sp, (2,))
                s.token_ids += torch.randint(0, V, (200,), generator=g).tolist()
                s.status, s.block_table = Status.RUNNING, [0] * (1200 // 16 + 1)
                seqs.append(s)
            chunks = [SimpleNamespace(seq=s, start=len(s) - 1, length=1, end=len(s), sample=True, pending=0)
                      for s in seqs]
            planner, last = SamplingPlanner(256, V), LastStageSampler(V, torch.device("cuda"))

            def view():
                header, plan = build_plan(0, 0, chunks, 16, 0, None, planner.prepare(chunks))
                return PlanView(header.tolist(), torch.from_numpy(plan).cuda())
            last(logits, view())  # fills the slots
            v = view()
            out.append({"rows": R, "vocab": V, "mode": mode, "step_ms": _time_ms(lambda: last(logits, v), iters)})
    plain = {r["rows"]: r["step_ms"] for r in out if r["mode"] == "plain"}
    print(f"{'rows':>5} {'extras':<22} {'step ms':>8} {'vs plain':>9}")
    for r in out:
        r["minus_plain_ms"] = r["step_ms"] - plain[r["rows"]]
        print(f"{r['rows']:>5} {r['mode']:<22} {r['step_ms']:>8.3f} {r['minus_plain_ms']:>+9.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,64,256")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel alone per (BLOCK, S, num_warps)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sampler needs CUDA")
    from model import sampler
    from model.sampler_triton import filtered_gumbel_argmax
    V = args.vocab
    results = []
    for R in (int(r) for r in args.rows.split(",")):
        g = torch.Generator().manual_seed(R)
        logits = (torch.randn(R, V, generator=g) * 2).bfloat16().float().cuda()  # ties, as after a bf16 matmul
        for mode, (t, k, p, mp) in MODES.items():
            packed, flags = sampler.pack_rows([(t, k, p, mp, 1234 + i, 7) for i in range(R)])
            rows = torch.from_numpy(packed).cuda()
            rec = {"rows": R, "vocab": V, "mode": mode,
                   "torch_ms": _time_ms(lambda: torch_path(logits, rows, flags), args.iters),
                   "kernel_ms": _time_ms(lambda: sampler.sample(logits, rows, flags), args.iters)}
            assert sampler._FUSED_OK[0], "the fused sampler fell back to torch"
            if flags & sampler.F_FILTERED:
                temp = rows[:, 0].view(torch.float32)
                x = logits / temp[:, None]
                m = x.amax(-1)
                floor = sampler.min_p_floor(x, rows[:, 3].view(torch.float32), m)
                rec["kernel_only_ms"] = _time_ms(lambda: filtered_gumbel_argmax(x, rows, floor, m), args.iters)
                n = filtered_gumbel_argmax(x, rows, floor, m, passes=True)[2].float()
                rec["search_passes_mean"], rec["search_passes_max"] = n.mean().item(), n.max().item()
            results.append(rec)
    greedy = {r["rows"]: r["kernel_ms"] for r in results if r["mode"] == "greedy"}
    print(f"{'rows':>5} {'mode':<20} {'torch ms':>9} {'kernel ms':>10} {'kern only':>10} {'passes':>7} "
          f"{'vs greedy':>10}")
    for r in results:
        r["kernel_minus_greedy_ms"] = r["kernel_ms"] - greedy[r["rows"]]
        print(f"{r['rows']:>5} {r['mode']:<20} {r['torch_ms']:>9.3f} {r['kernel_ms']:>10.3f} "
              f"{r.get('kernel_only_ms', float('nan')):>10.3f} {r.get('search_passes_mean', 0):>7.2f} "
              f"{r['kernel_minus_greedy_ms']:>+10.3f}")
    sweep = []
    if args.sweep:
        for R in sorted({min(int(r) for r in args.rows.split(",")), max(int(r) for r in args.rows.split(","))}):
            g = torch.Generator().manual_seed(R)
            x = (torch.randn(R, V, generator=g) * 2).bfloat16().float().cuda() / 0.8
            m = x.amax(-1)
            for mode in ("top_p0.9", "top_k50"):
                t, k, p, mp = MODES[mode]
                rows = torch.from_numpy(sampler.pack_rows([(t, k, p, mp, i, 0) for i in range(R)])[0]).cuda()
                floor = sampler.min_p_floor(x, rows[:, 3].view(torch.float32), m)
                for blk, s, nw in ((1024, 8, 8), (1024, 8, 4), (2048, 8, 8), (2048, 8, 16), (1024, 16, 8),
                                   (4096, 8, 16), (512, 8, 4), (512, 16, 4)):
                    ms = _time_ms(lambda: filtered_gumbel_argmax(x, rows, floor, m, None, blk, s, nw), args.iters)
                    sweep.append({"rows": R, "mode": mode, "BLOCK": blk, "S": s, "num_warps": nw, "kernel_only_ms": ms})
                    print(f"sweep R {R:>4} {mode:<10} BLOCK {blk:>5} S {s:>3} warps {nw:>2}: {ms:.3f} ms")
    extras = extras_rows(V, args.iters)
    if args.out:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
                "torch": torch.__version__, "triton": __import__("triton").__version__}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "sweep": sweep, "extras": extras}, indent=1))


if __name__ == "__main__":
    main()
