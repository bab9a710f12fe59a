"""`python -m engine generate`: stream one prompt's tokens, then a summary line. Starts the stages
itself, or under torchrun runs one stage per process (rank 0 drives and prints)."""
from __future__ import annotations

import os
import time

from ..options import add_option_flags, options_from_args
from ..params import SamplingParams
from .common import default_model, parse_prompt_ids, print_summary, stream_print

DEFAULT_PROMPT = "The quick brown fox"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", help="model folder or hub id ORG/NAME (default: the embedded tiny preset)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"[default: {DEFAULT_PROMPT!r}]")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="[default: 32]")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [default: 0]")
    p.add_argument("--top-k", type=int, default=0, help="0 = off [default: 0]")
    p.add_argument("--top-p", type=float, default=1.0, help="[default: 1.0]")
    p.add_argument("--min-p", type=float, default=0.0, help="[default: 0.0]")
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true")
    add_option_flags(p, defaults={"stages": None})
    p.set_defaults(run=run)


def run(a) -> int:
    stages = a.stages if a.stages is not None else (1 if a.model else 2)
    opts = options_from_args(a, stages=stages)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            min_p=a.min_p, seed=a.sample_seed, ignore_eos=a.ignore_eos)
    ids = parse_prompt_ids(a.prompt_ids)
    prompt = ids if ids is not None else a.prompt
    model = a.model or default_model()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .torchrun import run_torchrun_generate
        return run_torchrun_generate(model, opts, prompt, params)
    from ..llm import LLM
    from ..request_checks import encode_prompt
    with LLM(model, options=opts) as llm:
        ids = encode_prompt(prompt, llm.tokenizer, llm.config.vocab_size)
        t0 = time.perf_counter()
        new = stream_print(llm.stream([ids], params), llm.tokenizer)
        dt = time.perf_counter() - t0
        print_summary(len(ids), new, dt, llm.stats(reset=True)["stages"])
    return 0
