"""`python -m engine profile`: run a workload, report how long each stage was busy and idle (per
step and in total), and which split of layers would even the stages out."""
from __future__ import annotations

import json
import time

from ..options import add_option_flags, options_from_args
from ..params import SamplingParams
from .common import default_model


def suggest_layers(stats: list[dict], num_layers: int) -> tuple[list[int], list[float]]:
    """Layer counts that even out the stages' busy time, with each stage's predicted busy time.

    Decoder layers have identical shapes, so one per-layer cost c is fitted (busy/layers of the
    stages without embed or head where there are some, else of the first stage, whose embedding
    lookup is negligible); what the last stage spends beyond n*c is its head (norm, lm_head,
    sampling). Then the layer counts solving n_r*c + extra_r = equal are rounded to sum L."""
    n = [s["layers"][1] - s["layers"][0] for s in stats]
    busy = [s["busy_ms"] for s in stats]
    middle = [b / k for b, k in zip(busy[1:-1], n[1:-1])] or [busy[0] / n[0]]
    c = sorted(middle)[len(middle) // 2]
    if c <= 0:
        return n, busy
    extra = [max(0.0, b - k * c) for b, k in zip(busy, n)]
    extra[0] = 0.0 if len(stats) > 1 else extra[0]
    target = (num_layers * c + sum(extra)) / len(stats)
    ideal = [max(1.0, (target - e) / c) for e in extra]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) < num_layers:  # hand out the remainder where the shortfall is largest
        counts[max(range(len(counts)), key=lambda r: ideal[r] - counts[r])] += 1
    while sum(counts) > num_layers:
        counts[max(range(len(counts)), key=lambda r: counts[r] - ideal[r] if counts[r] > 1 else -1e9)] -= 1
    return counts, [k * c + e for k, e in zip(counts, extra)]


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="per-stage busy/idle time and a balanced layer split")
    p.add_argument("--model", help="model folder or hub id (default: the embedded tiny preset)")
    p.add_argument("--batch", type=int, default=8, help="concurrent requests")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="per-step rows to print")
    p.add_argument("--json", action="store_true")
    add_option_flags(p, defaults={"stages": 2})
    p.set_defaults(run=run_profile)


def run_profile(a) -> int:
    import torch
    from ..llm import LLM
    with LLM(a.model or default_model(), options=options_from_args(a)) as llm:
        g = torch.Generator().manual_seed(0)
        V = llm.config.vocab_size
        prompts = [torch.randint(0, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
        llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
        llm.stats(reset=True)
        t0 = time.perf_counter()
        llm.generate(prompts, sp)
        wall_ms = (time.perf_counter() - t0) * 1e3
        stats = llm.stats(reset=True, per_step=True)["stages"]
        L = llm.config.num_hidden_layers
    counts, predicted = suggest_layers(stats, L)
    report = {"wall_ms": wall_ms, "stages": stats, "suggested_layers": counts, "predicted_busy_ms": predicted}
    if a.json:
        print(json.dumps(report))
        return 0
    print(f"workload: {a.batch} requests x {a.prompt_len} prompt tokens + {a.max_tokens} new; wall {wall_ms:.0f} ms")
    print(f"{'stage':>5} {'layers':>9} {'steps':>6} {'busy ms':>10} {'idle ms':>10} {'busy %':>7} {'ms/step':>8}")
    for s in stats:
        lay = f"{s['layers'][0]}-{s['layers'][1] - 1}"
        print(f"{s['rank']:>5} {lay:>9} {s['steps']:>6} {s['busy_ms']:>10.1f} {wall_ms - s['busy_ms']:>10.1f} "
              f"{100 * s['busy_ms'] / wall_ms:>6.1f}% {s['busy_ms'] / max(1, s['steps']):>8.2f}")
    print(f"per step (ms busy, tokens), first {a.steps}:")
    for i in range(min(a.steps, min(len(s["step_ms"]) for s in stats))):
        print(f"  step {i:>3}: " + "  ".join(f"s{s['rank']} {s['step_ms'][i]:7.2f} ({s['step_tokens'][i]})" for s in stats))
    now = [s["layers"][1] - s["layers"][0] for s in stats]
    if counts != now:
        pred = ", ".join(f"{p:.0f}" for p in predicted)
        cur = ", ".join(f"{s['busy_ms']:.0f}" for s in stats)
        print(f"suggested split: --layers {','.join(map(str, counts))} (predicted busy ms {pred}; now {cur})")
    else:
        print(f"the current split {','.join(map(str, now))} is already the most even one")
    return 0
