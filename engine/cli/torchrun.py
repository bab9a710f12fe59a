"""`generate` under torchrun (one process per stage, possibly on several hosts): the same options and
checks as LLM; rank 0 drives the scheduler and prints, the other ranks serve their stage."""
from __future__ import annotations

import os
import time

import torch.distributed as dist

from loader.model_files import load_tokenizer

from ..options import EngineOptions
from ..params import SamplingParams
from ..runtime.launch import build_rank, init_distributed, resolve_engine
from .common import print_summary, stream_print


def run_torchrun_generate(model: str, opts: EngineOptions, prompt, params: SamplingParams) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args, cfg, folder = resolve_engine(model, opts.with_(stages=world))
    tok = load_tokenizer(folder) if folder is not None else None
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError("this checkpoint has no tokenizer.json: give --prompt-ids")
        ids = tok.encode(prompt)
    else:
        ids = prompt
    init_distributed(rank, world, args.options.device)
    r = build_rank(args, rank, local_rank)
    if rank != 0:
        r.worker.serve()
        dist.destroy_process_group()
        return 0
    engine = r.engine
    engine.scheduler.check(len(ids), params.max_tokens)
    engine.add(0, ids, params)

    def events():
        while engine.has_work:
            yield from (e[:3] for e in engine.step())  # (seq id, token, reason); extras dropped
    t0 = time.perf_counter()
    new = stream_print(events(), tok)
    dt = time.perf_counter() - t0
    print_summary(len(ids), new, dt, [engine.worker.stats(reset=True)])
    engine.shutdown()
    dist.destroy_process_group()
    return 0
