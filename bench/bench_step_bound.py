"""The step bound (--max-step-ms) offline: n prompts of plen tokens -> out tokens, half of them
submitted while the other half decodes (so that prefill chunks ride with decodes under the bound),
then each measured step of stage 0 by its token count, the calibrated scale of the step-cost model,
the chunks it cut and the steps past it. --bound 0 runs the same work unbounded.

    python bench/bench_step_bound.py --preset qwen3-30b-a3b --bound 45 --prompts 64 --prompt-len 1024 --out-len 128
    python bench/bench_step_bound.py --preset tiny --bound 2 --prompts 8 --prompt-len 64 --out-len 8   # CPU"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM  # noqa: E402
from engine.params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--bound", type=float, default=45.0, help="--max-step-ms (0: off)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--out-len", type=int, default=128)
    a = ap.parse_args()
    if a.prompts < 2 or a.prompt_len < 1 or a.out_len < 1 or a.bound < 0:
        raise SystemExit("error: --prompts >= 2, --prompt-len and --out-len >= 1, --bound >= 0")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    with LLM(a.preset, load_format="dummy", device=dev, max_step_ms=a.bound, verbose=False) as llm:
        vocab = min(llm.config.vocab_size, 1000)
        prompts = [torch.randint(10, vocab - 10, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
        sp = SamplingParams(max_tokens=a.out_len, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm
        llm.stats(reset=True)
        t0 = time.perf_counter()
        first = threading.Thread(target=llm.generate, args=(prompts[:a.prompts // 2], sp))
        first.start()
        time.sleep(0.5)  # the first half prefilled and decoding, on a GPU, when the second arrives
        llm.generate(prompts[a.prompts // 2:], sp)
        first.join()
        wall = time.perf_counter() - t0
        st = llm.stats(per_step=True)
    sch, stage = st["scheduler"], st["stages"][0]
    n = a.prompts
    print(f"{a.preset} on {dev}, bound {a.bound:g} ms: {n} x ({a.prompt_len} -> {a.out_len}) in {wall:.1f} s; "
          f"scale {sch.get('step_cost_scale')}, observed {sch.get('step_cost_observed')}, "
          f"chunks cut {sch['step_bound_cuts']}, steps past the bound {sch['step_bound_over']}")
    bins: dict[str, list] = {}
    for ms, tok in zip(stage.get("step_ms", []), stage.get("step_tokens", [])):
        k = ("<= n/2" if tok <= n // 2 else "<= n" if tok <= n else "<= n+1024" if tok <= n + 1024 else "> n+1024")
        bins.setdefault(k, []).append((ms, tok))
    for k, v in sorted(bins.items()):
        print(f"  steps of {k:9s} tokens: {len(v):4d}, median {statistics.median(m for m, _ in v):7.2f} ms at "
              f"{statistics.median(t for _, t in v):.0f} tokens")


if __name__ == "__main__":
    main()
