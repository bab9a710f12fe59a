"""The same stage code under torchrun (one process per stage, possibly on several hosts):
rank 0 drives the scheduler and prints, the other ranks serve their stage until told to stop."""
from __future__ import annotations

import os
import time

import torch.distributed as dist

from model.config import parse_dtype

from .launch import EngineArgs, build_rank, init_distributed
from .model_files import load_tokenizer, resolve_model, stop_token_ids
from .params import SamplingParams


def run_torchrun_generate(a, model: str, prompt, params: SamplingParams) -> int:
    from .cli_generate import engine_kwargs, print_summary, stream_print
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    folder, hub = resolve_model(model)
    kw = engine_kwargs(a)
    device = kw["device"] or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    dtype = parse_dtype(kw["dtype"]) or (parse_dtype("bfloat16") if device == "cuda" else parse_dtype("float32"))
    args = EngineArgs(str(folder), world, device, str(dtype).removeprefix("torch."), kw["layers"], kw["block_size"],
                      kw["kv_cache_gib"], kw["gpu_memory_utilization"], kw["max_num_seqs"],
                      kw["max_num_batched_tokens"], kw["max_model_len"], kw["attention"], 0, hub, None,
                      stop_token_ids(folder), kw["verbose"], kw["enforce_eager"])
    init_distributed(rank, world, device)
    r = build_rank(args, rank, local_rank)
    if rank != 0:
        r.worker.serve()
        dist.destroy_process_group()
        return 0
    tok = load_tokenizer(folder)
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    engine = r.engine
    engine.add(0, ids, params)

    def events():
        while engine.has_work:
            yield from engine.step()
    t0 = time.perf_counter()
    new = stream_print(events(), tok)
    dt = time.perf_counter() - t0
    print_summary(len(ids), new, dt, engine.stats(reset=True))
    engine.shutdown()
    dist.destroy_process_group()
    return 0
