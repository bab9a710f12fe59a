"""Multi-turn benchmark of the prefix cache: one conversation grows to --target tokens in --turns
turns, and each turn's time to first token is measured with the cache on and off. Turn 1 is the
long document; every later turn sends the whole conversation again, i.e. the previous prompt, the
previous answer (--answer-tokens) and a new question (--question-tokens), ending at --target.
With the cache, a later turn computes only its new tokens (and the last block before them).

    python bench/bench_multiturn.py --preset qwen3-30b-a3b --stages 1 --target 90000,128000 \\
        --out bench/results/multiturn.json
    python bench/bench_multiturn.py --preset tiny --device cpu --target 600 --turns 3   # CPU smoke test

Weights are dummy (random on each stage); the model is the preset's shape with Qwen's YaRN override
when --target passes the preset's positions (as bench/bench_e2e.py). Prints a table last; JSON goes
to --out."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def conversation(rand, target: int, turns: int, question: int, answer: int) -> tuple[list[int], list[list[int]]]:
    """The first prompt and each later turn's new question: turn k's prompt is turn k-1's prompt,
    its answer, and question k; the last prompt plus its answer is `target` tokens."""
    first = target - (turns - 1) * (question + answer) - answer
    if first < 1:
        raise SystemExit(f"error: --target {target} is too short for {turns} turns of {question} + {answer} tokens")
    return rand(first), [rand(question) for _ in range(turns - 1)]


def run_conversation(llm, first: list[int], questions: list[list[int]], answer: int) -> list[dict]:
    from engine import SamplingParams
    sp = SamplingParams(max_tokens=answer, temperature=0.0, ignore_eos=True)
    prompt, rows = first, []
    for turn in range(len(questions) + 1):
        before = llm.stats()["scheduler"]
        t0, ttft, out = time.perf_counter(), None, []
        for _, tok, _ in llm.stream([prompt], sp):
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            out.append(tok)
        total = time.perf_counter() - t0
        after = llm.stats()["scheduler"]
        rows.append({"turn": turn + 1, "prompt_tokens": len(prompt), "ttft_s": round(ttft, 4),
                     "turn_s": round(total, 4),
                     "cached_tokens": after.get("prefix_cache_hits", 0) - before.get("prefix_cache_hits", 0)})
        print(json.dumps(rows[-1]), flush=True)
        if turn < len(questions):
            prompt = prompt + out + questions[turn]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--target", type=ints, default=[90000, 128000], help="conversation lengths, tokens")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--question-tokens", type=int, default=200)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--cache", default="on,off", help="on, off or both (the order they run in)")
    ap.add_argument("--engine-args", default="{}", help="more LLM keyword arguments as JSON")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.turns < 1:
        raise SystemExit("error: --turns must be at least 1")
    modes = [m.strip() for m in a.cache.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise SystemExit(f"error: --cache {a.cache!r}: expected on, off or on,off")

    import torch
    from engine import LLM
    from loader.presets import PRESETS, preset_config, yarn_config
    if a.preset not in PRESETS:
        raise SystemExit(f"error: --preset {a.preset}: expected one of {', '.join(sorted(PRESETS))}")
    cfg = preset_config(a.preset)
    if max(a.target) > cfg["max_position_embeddings"]:
        cfg = yarn_config(cfg, max(131072, max(a.target)))
    folder = Path(tempfile.mkdtemp(prefix="bench_multiturn_")) / a.preset
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else "cpu"
    result = {"date": datetime.date.today().isoformat(), "card": card,
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "preset": a.preset,
              "stages": a.stages, "turns": a.turns, "question_tokens": a.question_tokens,
              "answer_tokens": a.answer_tokens, "runs": []}
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(10, cfg["vocab_size"] - 10, (n,), generator=g).tolist()
    convs = {t: conversation(rand, t, a.turns, a.question_tokens, a.answer_tokens) for t in a.target}
    for mode in modes:
        kw = dict(stages=a.stages, device=a.device, load_format="dummy", verbose=False,
                  enable_prefix_caching=mode == "on", **json.loads(a.engine_args))
        with LLM(str(folder), **kw) as llm:
            llm.generate([rand(128)], __import__("engine").SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
            for t in a.target:
                llm.reset_prefix_cache()
                print(f"cache {mode}, conversation of {t} tokens", flush=True)
                result["runs"].append({"cache": mode, "target": t, "turns": run_conversation(llm, *convs[t],
                                                                                            a.answer_tokens)})
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    print(f"\n== multi-turn TTFT (s), {r['card']}, {r['preset']}, {r['stages']} stage(s), {r['date']} ==")
    print(f"{'target':>8} {'cache':>5} " + " ".join(f"{'turn ' + str(i + 1):>9}" for i in range(r["turns"])))
    for run in r["runs"]:
        print(f"{run['target']:>8} {run['cache']:>5} " + " ".join(f"{x['ttft_s']:>9.3f}" for x in run["turns"]))


if __name__ == "__main__":
    sys.exit(main())
