"""Start one pipeline rank: join torch.distributed, load the rank's stage, size and allocate the
KV pool (minimum over ranks), then serve. Used by LLM's spawned processes and under torchrun."""
from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from loader.load import load_stage
from loader.partition import partition
from model.config import ModelConfig, parse_dtype

from .block_manager import BlockManager
from .pipeline import PipelineEngine
from .scheduler import RequestRefused, Scheduler
from .stage_worker import StageWorker, agree_min


@dataclass
class EngineArgs:
    model_dir: str
    stages: int
    device: str  # "cuda" or "cpu"
    dtype: str
    layer_counts: list[int] | None = None
    block_size: int = 16
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    attention: str | None = None
    seed: int = 0
    hub_repo: str | None = None  # set when model_dir is a hub snapshot: fetch this rank's shards
    revision: str | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    verbose: bool = True
    enforce_eager: bool = False  # no CUDA graphs for decode


@dataclass
class Rank:
    """A loaded rank: its worker and, on rank 0, the engine."""
    rank: int
    worker: StageWorker
    engine: PipelineEngine | None
    info: dict


def _log(rank: int, verbose: bool):
    return (lambda msg: print(f"[moepipe] {msg}", file=sys.stderr, flush=True)) if verbose else None


def build_rank(args: EngineArgs, rank: int, local_rank: int) -> Rank:
    """Everything after init_process_group: load, size the KV pool, build the engine on rank 0."""
    cfg = ModelConfig.from_file(args.model_dir)
    spec = partition(cfg.num_hidden_layers, args.stages, args.layer_counts)[rank]
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = parse_dtype(args.dtype)
    log = _log(rank, args.verbose)
    t0 = time.perf_counter()
    if args.hub_repo:
        from loader.hub import fetch_stage_shards
        fetch_stage_shards(args.hub_repo, Path(args.model_dir), cfg, spec, args.revision)
    stage = load_stage(args.model_dir, cfg, spec, device, dtype, args.attention, log)
    load_s = time.perf_counter() - t0
    groups = (None, None)
    if args.stages > 1:
        groups = (dist.new_group(list(range(args.stages))), dist.new_group(list(range(args.stages))))
    worker = StageWorker(stage, rank, args.stages, args.block_size, *groups, seed=args.seed + rank)
    max_len = min(args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    blocks = worker.size_kv_pool(args.kv_cache_gib, args.gpu_memory_utilization,
                                 min(args.max_num_batched_tokens, max_len))
    blocks = agree_min(blocks, device)
    if blocks < 1:
        raise RuntimeError(f"stage {rank}: no memory left for the KV cache after loading "
                           f"(gpu_memory_utilization={args.gpu_memory_utilization}); lower it or use more stages")
    worker.allocate(blocks)
    if device.type == "cuda" and not args.enforce_eager:
        t1 = time.perf_counter()
        worker.capture_graphs(max_len, min(args.max_num_seqs, 256))
        if log:
            log(f"stage {rank}: captured decode graphs for batch sizes {worker.graphs.buckets} "
                f"in {time.perf_counter() - t1:.1f} s")
    info = {"num_blocks": blocks, "block_size": args.block_size, "max_model_len": max_len, "load_s": load_s,
            "layers": [spec.start, spec.end], "device": str(device),
            "kv_gib": blocks * stage.kv_bytes_per_block(args.block_size) / 2**30}
    if log:
        log(f"stage {rank}: layers {spec.start}..{spec.end - 1} on {device}, loaded in {load_s:.1f} s; "
            f"KV pool {blocks} blocks x {args.block_size} tokens ({info['kv_gib']:.2f} GiB)")
    engine = None
    if rank == 0:
        sched = Scheduler(BlockManager(blocks, args.block_size), args.max_num_seqs, args.max_num_batched_tokens,
                          max_len, args.stages)
        engine = PipelineEngine(worker, sched, args.stop_ids)
    return Rank(rank, worker, engine, info)


def init_distributed(rank: int, world: int, device: str, addr: str | None = None, port: int | None = None) -> None:
    if world == 1 and not dist.is_available():
        return
    if addr is not None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    backend = "nccl" if device == "cuda" else "gloo"
    # Idle stages wait in recv between generate calls: a long timeout, and dead peers are ended by
    # the parent (spawned mode) or torchrun's agent instead.
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(hours=24),
                            **({"device_id": torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")}
                               if backend == "nccl" else {}))


def _exit_with_parent() -> None:
    """A stage whose parent died (kill -9) ends itself instead of lingering."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


def spawned_main(rank: int, args: EngineArgs, port: int, req_q, out_q, status_q) -> None:
    """Entry point of a process started by LLM: serve until shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which ends us
    _exit_with_parent()
    try:
        if args.device == "cuda":
            torch.cuda.set_device(rank)
        init_distributed(rank, args.stages, args.device, "127.0.0.1", port)
        r = build_rank(args, rank, rank)
        status_q.put(("ready", rank, r.info))
        if rank == 0:
            serve_requests(r.engine, req_q, out_q)
        else:
            r.worker.serve()
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as e:  # report, then die: the parent ends the other stages
        status_q.put(("error", rank, f"{type(e).__name__}: {e}"))
        status_q.close()
        status_q.join_thread()  # os._exit would drop a message still in the feeder thread
        sys.stderr.flush()
        os._exit(1)


def serve_requests(engine: PipelineEngine, req_q, out_q) -> None:
    """Rank 0's loop in spawned mode: take requests from the parent, step, stream events back."""
    while True:
        try:
            msg = req_q.get(block=not engine.has_work, timeout=None)
        except queue.Empty:
            msg = None
        while msg is not None:
            kind = msg[0]
            if kind == "add":
                for rid, prompt, params in msg[1]:
                    try:
                        engine.add(rid, prompt, params)
                    except RequestRefused as e:
                        out_q.put(("refused", rid, str(e)))
            elif kind == "stats":
                out_q.put(("stats", engine.stats(reset=msg[1])))
            elif kind == "shutdown":
                engine.shutdown()
                return
            try:
                msg = req_q.get_nowait()
            except queue.Empty:
                msg = None
        if engine.has_work:
            events = engine.step()
            if events:
                out_q.put(("events", events))
