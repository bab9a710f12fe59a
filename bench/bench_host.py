"""Host time of a fresh long prompt through the public API, on CPU: everything `LLM.generate` spends
outside the stages' forwards (prompt checks, the pipe to rank 0, scheduling, prefix-cache keys,
the plan, sampling, the events back), with a model so small that the forward is cheap.

    python bench/bench_host.py                       (8192-token prompts, max_tokens=1, greedy)
    python bench/bench_host.py --tokens 2048,8192 --stages 2 --profile

Per prompt: wall time of generate(), the stages' busy time (llm.stats(): the forwards, summed over
stages, which run one after another for a single micro-batch) and the difference. --profile also
drives rank 0's engine in this process (engine.add / engine.step, as bench_breakdown.py does) under
cProfile and lists the engine's functions by cumulative time. Prints JSON lines."""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_config(folder: Path, layers: int, max_len: int) -> Path:
    """The tiny preset cut to one kv head of 8 dims and 4 experts, positions up to max_len."""
    from loader.presets import preset_config
    d = preset_config("tiny")
    d.update(num_hidden_layers=layers, num_attention_heads=1, num_key_value_heads=1, head_dim=8, hidden_size=32,
             intermediate_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=1,
             max_position_embeddings=max_len)
    path = folder / "config.json"
    path.write_text(json.dumps(d))
    return path


def end_to_end(cfg: Path, stages: int, tokens: int, prompts: int) -> dict:
    import torch
    from engine import LLM, SamplingParams
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(tokens)
    rows = []
    with LLM(str(cfg), stages=stages, device="cpu", load_format="dummy", kv_cache_gib=0.05, verbose=False) as llm:
        for _ in range(prompts + 1):  # the first is a warm-up
            ids = torch.randint(3, llm.config.vocab_size, (tokens,), generator=g).tolist()  # fresh: no cache hit
            llm.stats(reset=True)
            t = time.perf_counter()
            llm.generate([ids], sp)
            wall = time.perf_counter() - t
            busy = sum(s["busy_ms"] for s in llm.stats(reset=True)["stages"]) / 1e3
            rows.append((wall, busy))
    rows = rows[1:]
    med = lambda xs: round(1e3 * statistics.median(xs), 3)
    return {"what": "host", "tokens": tokens, "stages": stages, "prompts": prompts,
            "wall_ms": med([w for w, _ in rows]), "busy_ms": med([b for _, b in rows]),
            "outside_ms": med([w - b for w, b in rows])}


def profile_rank0(cfg: Path, tokens: int, prompts: int) -> None:
    import torch
    from engine.options import EngineOptions
    from engine.params import SamplingParams
    from engine.runtime.launch import build_rank, resolve_engine
    args, model_cfg, _ = resolve_engine(str(cfg), EngineOptions(load_format="dummy", device="cpu", verbose=False,
                                                                kv_cache_gib=0.05))
    engine = build_rank(args, 0, 0).engine
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(tokens)
    prof = cProfile.Profile()
    for i in range(prompts + 1):
        engine.add(i, torch.randint(3, model_cfg.vocab_size, (tokens,), generator=g).tolist(), sp)
        if i:
            prof.enable()
        while engine.has_work:
            engine.step()
        prof.disable()
    print(f"rank 0 in-process, {prompts} prompts of {tokens} tokens: engine functions by cumulative time")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"engine/", 30)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192", help="prompt lengths, comma-separated")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per length (after one warm-up)")
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also cProfile rank 0's engine in this process")
    a = ap.parse_args(argv)
    lengths = [int(x) for x in a.tokens.split(",") if x]
    out = []
    with tempfile.TemporaryDirectory() as d:
        cfg = tiny_config(Path(d), max(a.stages, 1), max(lengths) + 8)
        for L in lengths:
            out.append(end_to_end(cfg, a.stages, L, a.prompts))
            print(json.dumps(out[-1]), flush=True)
            if a.profile:
                profile_rank0(cfg, L, a.prompts)
    return out


if __name__ == "__main__":
    main()
