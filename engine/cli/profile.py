"""`python -m engine profile`: run a workload, report how long each stage was busy and idle (per
step and in total) and its bubble fraction on the timeline, optionally write the timeline
(--trace), and the split of layers that would even the stages out (engine/tools/auto_split.py)."""
from __future__ import annotations

import json
import time

from ..options import add_option_flags, options_from_args
from ..params import SamplingParams
from .common import default_model


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="per-stage busy/idle time, bubbles, a timeline and a balanced layer split")
    p.add_argument("--model", help="model folder or hub id (default: the embedded tiny preset)")
    p.add_argument("--batch", type=int, default=8, help="concurrent requests")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="per-step rows to print")
    p.add_argument("--trace", metavar="FILE.json", default=None,
                   help="write the run's timeline as a Chrome trace-event file (ui.perfetto.dev, chrome://tracing)")
    p.add_argument("--json", action="store_true")
    add_option_flags(p, defaults={"stages": 2})
    p.set_defaults(run=run_profile)


def suggest(llm, stages: list[dict]):
    """The balanced split for the measured costs, each stage's predicted busy ms, and the costs."""
    from model.config import parse_dtype

    from ..tools.auto_split import choose_split, costs_from_stats, memory_model
    costs = costs_from_stats(stages, llm.config.num_hidden_layers)
    o, memory = llm.options, None
    if o.device == "cuda" and o.kv_cache_gib is None and all("card_bytes" in s for s in stages):
        cards = [int(s["card_bytes"] * o.gpu_memory_utilization) for s in stages]
        memory = memory_model(llm.config, len(stages), parse_dtype(o.dtype), cards)
    counts = choose_split(costs, len(stages), memory)
    return counts, costs.stage_ms(counts), costs


def run_profile(a) -> int:
    import torch

    from ..llm import LLM
    from ..runtime.trace import stop_profile
    for name in ("batch", "prompt_len", "max_tokens"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    with LLM(a.model or default_model(), options=options_from_args(a)) as llm:
        g = torch.Generator().manual_seed(0)
        V = llm.config.vocab_size
        prompts = [torch.randint(0, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
        llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
        llm.stats(reset=True, profile={"op": "start", "trace": True, "layers": True})
        t0 = time.perf_counter()
        llm.generate(prompts, sp)
        wall_ms = (time.perf_counter() - t0) * 1e3
        prof = stop_profile(llm, a.trace, reset=True, per_step=True)
        stats = prof["stages"]
        counts, predicted, costs = suggest(llm, stats)
        auto = llm.auto_split
    bubble = prof["bubble"]
    sample_ms = stats[-1].get("sample_ms") or 0.0
    extra = {"layer_ms_median": sorted(costs.layer_ms)[len(costs.layer_ms) // 2], "embed_ms": costs.embed_ms,
             "head_ms": max(0.0, costs.head_ms - sample_ms), "sample_ms": sample_ms}
    report = {"wall_ms": wall_ms, "stages": stats, "bubble": bubble, "trace": prof["path"],
              "suggested_layers": counts, "predicted_busy_ms": predicted, "auto_split": auto,
              "costs": extra}
    if a.json:
        print(json.dumps(report))
        return 0
    if auto is not None:
        before = ", ".join(f"{x:.0f}" for x in auto["before_ms"])
        after = ", ".join(f"{x:.0f}" for x in auto["predicted_ms"])
        print(f"auto split (built-in warm-up workload): before {','.join(map(str, auto['before']))} busy ms {before}; "
              f"after {','.join(map(str, auto['after']))} predicted {after}; this run measured below")
    print(f"workload: {a.batch} requests x {a.prompt_len} prompt tokens + {a.max_tokens} new; wall {wall_ms:.0f} ms")
    print(f"{'stage':>5} {'layers':>9} {'steps':>6} {'busy ms':>10} {'idle ms':>10} {'busy %':>7} {'ms/step':>8} "
          f"{'bubble %':>9}")
    for s in stats:
        lay = f"{s['layers'][0]}-{s['layers'][1] - 1}"
        b = bubble.get(s["rank"])
        print(f"{s['rank']:>5} {lay:>9} {s['steps']:>6} {s['busy_ms']:>10.1f} {wall_ms - s['busy_ms']:>10.1f} "
              f"{100 * s['busy_ms'] / wall_ms:>6.1f}% {s['busy_ms'] / max(1, s['steps']):>8.2f} "
              f"{'-' if b is None else f'{100 * b:.1f}%':>9}")
    print("bubble: share of the timeline (first to last slice of any stage) in which the stage's device ran "
          "nothing (forwards and sampling)")
    print(f"busy ms over this run: each decoder layer {extra['layer_ms_median']:.1f} ms (median); stage 0's embedding "
          f"{extra['embed_ms']:.1f} ms; the last stage's extra work: final norm + lm_head {extra['head_ms']:.1f} ms, "
          f"sampling {extra['sample_ms']:.1f} ms")
    print(f"per step (ms busy, tokens), first {a.steps}:")
    for i in range(min(a.steps, min(len(s["step_ms"]) for s in stats))):
        print(f"  step {i:>3}: " + "  ".join(f"s{s['rank']} {s['step_ms'][i]:7.2f} ({s['step_tokens'][i]})" for s in stats))
    now = [s["layers"][1] - s["layers"][0] for s in stats]
    if counts != now:
        pred = ", ".join(f"{p:.0f}" for p in predicted)
        cur = ", ".join(f"{s['busy_ms'] + s.get('sample_ms', 0.0):.0f}" for s in stats)
        print(f"suggested split: --layers {','.join(map(str, counts))} (predicted busy ms {pred}; now {cur}); "
              f"or --layers auto")
    else:
        print(f"the current split {','.join(map(str, now))} is already the most even one")
    if prof["path"]:
        print(f"timeline: {prof['path']} (open in ui.perfetto.dev or chrome://tracing)")
    return 0
