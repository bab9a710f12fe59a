"""`python -m engine generate`: stream one prompt's tokens, then a summary line. Spawns the stages
itself, or under torchrun runs one stage per process (rank 0 drives and prints)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .params import SamplingParams

DEFAULT_PROMPT = "The quick brown fox"


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", help="model folder or hub id ORG/NAME (default: the embedded tiny preset)")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages (default 2 for the embedded model, else 1)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    add_engine_options(p)


def add_engine_options(p) -> None:
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--layers", default=None, help="layers per stage, e.g. 25,23 (default: even split)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool per stage (default: measured)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget (prefill chunk) per step")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--attention", choices=["ref", "triton", "sdpa"], default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--quiet", action="store_true", help="no load progress")


def engine_kwargs(a) -> dict:
    from loader.partition import parse_layout
    return dict(device=a.device, dtype=a.dtype, layers=parse_layout(a.layers) if a.layers else None,
                block_size=a.block_size, kv_cache_gib=a.kv_cache_gib, gpu_memory_utilization=a.gpu_memory_utilization,
                max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                max_model_len=a.max_model_len, attention=a.attention, verbose=not a.quiet,
                enforce_eager=a.enforce_eager)


def default_model() -> str:
    from loader.writer import ensure_cached_preset
    return str(ensure_cached_preset("tiny"))


def run_generate(a) -> int:
    model = a.model or default_model()
    stages = a.stages or (1 if a.model else 2)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            seed=a.seed, ignore_eos=a.ignore_eos)
    prompt = [int(x) for x in a.prompt_ids.split(",")] if a.prompt_ids else a.prompt
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .torchrun import run_torchrun_generate
        return run_torchrun_generate(a, model, prompt, params)
    from .llm import LLM
    with LLM(model, stages=stages, **engine_kwargs(a)) as llm:
        ids = llm._encode(prompt)
        t0 = time.perf_counter()
        new = stream_print(llm.stream([ids], params), llm.tokenizer)
        dt = time.perf_counter() - t0
        print_summary(len(ids), new, dt, llm.stats(reset=True))
    return 0


def stream_print(events, tokenizer) -> list[int]:
    out: list[int] = []
    shown = ""
    for _, tok, _ in events:
        out.append(tok)
        if tokenizer is not None:
            text = tokenizer.decode(out)
            print(text[len(shown):], end="", flush=True)
            shown = text
        else:
            print(tok, end=" ", flush=True)
    print()
    return out


def print_summary(prompt_len: int, new: list[int], seconds: float, stats: list[dict]) -> None:
    busy = ", ".join(f"stage {s['rank']} {s['busy_ms'] / 1e3:.2f} s" for s in stats)
    print(f"prompt tokens: {prompt_len}, new tokens: {len(new)}, {len(new) / max(seconds, 1e-9):.1f} tokens/s "
          f"in {seconds:.2f} s; busy: {busy}", file=sys.stderr)
