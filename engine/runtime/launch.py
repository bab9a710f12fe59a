"""Resolve the options against the model, then start one pipeline rank: join torch.distributed, load
the rank's stage, size and allocate the KV pool (minimum over ranks), build the engine on rank 0.
Used by the worker processes LLM starts (engine/runtime/worker.py) and under torchrun."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from loader.model_files import resolve_model, stop_token_ids
from loader.partition import partition
from model.config import ModelConfig, parse_dtype

from ..options import EngineOptions
from .block_manager import BlockManager
from .chunking import StepCost
from .decode_graphs import BUCKETS
from .pipeline import PipelineEngine
from .scheduler import Scheduler
from .stage_worker import StageWorker, agree_min


AUTHKEY_ENV = "MOEPIPE_AUTHKEY"  # how LLM hands its workers the listener's key


@dataclass(frozen=True)
class EngineArgs:
    """What every rank needs: the options (device and dtype resolved), the model folder and stop ids."""
    model_dir: str
    options: EngineOptions
    hub_repo: str | None = None  # set when model_dir is a hub snapshot: each rank fetches its shards
    stop_ids: tuple[int, ...] = ()

    @property
    def stages(self) -> int:
        return self.options.stages


def resolve_engine(model: str, opts: EngineOptions) -> tuple[EngineArgs, ModelConfig, Path | None]:
    """Validate every option, alone and against the model's config and the machine, before any
    process starts. Returns the per-rank arguments, the config and the local folder."""
    opts.validate()
    if Path(model).exists():  # the stages run in another working directory
        model = str(Path(model).resolve())
    if opts.load_format == "dummy" and not Path(model).is_dir():
        from loader.dummy import dummy_config
        folder, hub_repo, cfg = None, None, dummy_config(model)  # a preset name or a config.json
    else:
        folder, hub_repo = resolve_model(model, opts.revision)
        if opts.load_format == "dummy":  # a folder of a hand-written config.json: read it as the stages will
            from loader.dummy import dummy_config
            cfg = dummy_config(folder)
        else:
            cfg = ModelConfig.from_file(folder)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if opts.stages > cfg.num_hidden_layers:
        raise ValueError(f"stages={opts.stages} exceeds the model's {cfg.num_hidden_layers} layers")
    if device == "cuda" and opts.stages > torch.cuda.device_count():
        raise ValueError(f"stages={opts.stages} needs {opts.stages} GPUs, only {torch.cuda.device_count()} visible")
    if opts.max_model_len is not None and opts.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={opts.max_model_len} must be in [1, {cfg.max_position_embeddings}] "
                         f"(max_position_embeddings of {cfg.source})")
    layers = opts.layers
    if layers == "auto":
        layers = None  # the measured split (engine/tools/auto_split.py) plugs in here; until then an even split
    if layers is not None:
        partition(cfg.num_hidden_layers, opts.stages, list(layers))  # validates
    if opts.attention not in (None, "ref") and device != "cuda":
        raise ValueError(f"attention {opts.attention!r} needs a CUDA device")
    dt = parse_dtype(opts.dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    if opts.kv_cache_gib is not None:  # refused here, not after the stages load
        most = max(s.end - s.start for s in partition(cfg.num_hidden_layers, opts.stages,
                                                      list(layers) if layers is not None else None))
        block = most * opts.block_size * cfg.kv_bytes_per_token_per_layer(dt)
        if opts.kv_cache_gib * 2**30 < block:
            raise ValueError(f"kv_cache_gib={opts.kv_cache_gib:g} holds no KV block: one block of {opts.block_size} "
                             f"tokens over a stage's {most} layers needs {block / 2**30:.3g} GiB")
    resolved = opts.with_(device=device, dtype=str(dt).removeprefix("torch."),
                          layers=list(layers) if layers is not None else None)
    stop = stop_token_ids(folder) if folder is not None else ()
    return EngineArgs(str(folder) if folder is not None else model, resolved, hub_repo, stop), cfg, folder


@dataclass
class Rank:
    """A loaded rank: its worker and, on rank 0, the engine."""
    rank: int
    worker: StageWorker
    engine: PipelineEngine | None
    info: dict


def _log(verbose: bool):
    return (lambda msg: print(f"[moepipe] {msg}", file=sys.stderr, flush=True)) if verbose else None


def _config(args: EngineArgs) -> ModelConfig:
    if args.options.load_format == "dummy":
        from loader.dummy import dummy_config
        return dummy_config(args.model_dir)
    return ModelConfig.from_file(args.model_dir)


def _load(args: EngineArgs, cfg: ModelConfig, spec, device: torch.device, dtype: torch.dtype, log):
    o = args.options
    if args.hub_repo and o.load_format != "dummy":
        from loader.hub import fetch_stage_shards
        fetch_stage_shards(args.hub_repo, Path(args.model_dir), cfg, spec, o.revision)
    from loader.load import load_stage
    return load_stage(args.model_dir, cfg, spec, device, dtype, o.attention, log, load_format=o.load_format,
                      seed=o.seed)


def build_rank(args: EngineArgs, rank: int, local_rank: int) -> Rank:
    """Everything after init_process_group: load, size the KV pool, build the engine on rank 0."""
    o = args.options
    cfg = _config(args)
    spec = partition(cfg.num_hidden_layers, o.stages, o.layers)[rank]
    device = torch.device(f"cuda:{local_rank}" if o.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = parse_dtype(o.dtype)
    log = _log(o.verbose)
    t0 = time.perf_counter()
    stage = _load(args, cfg, spec, device, dtype, log)
    load_s = time.perf_counter() - t0
    groups = None
    if o.stages > 1:  # the hop's fwd and ret groups (the default backend) and its host-memory ctrl group
        ranks = list(range(o.stages))
        groups = (dist.new_group(ranks), dist.new_group(ranks), dist.new_group(ranks, backend="gloo"))
    worker = StageWorker(stage, rank, o.stages, o.block_size, groups)
    max_len = min(o.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    # the largest micro-batch: the token budget, which several prompts can fill past max_len (the
    # memory-sizing forward runs it as one sequence, so within the positions the model has)
    step_tokens = min(o.max_num_batched_tokens, o.max_num_seqs * max_len, cfg.max_position_embeddings)
    blocks = worker.size_kv_pool(o.kv_cache_gib, o.gpu_memory_utilization, step_tokens)
    blocks = agree_min(blocks, device)
    if blocks < 1:
        raise RuntimeError(f"stage {rank}: no memory left for the KV cache after loading "
                           f"(gpu_memory_utilization={o.gpu_memory_utilization}); lower it or use more stages")
    worker.allocate(blocks)
    if device.type == "cuda":  # compile every Triton kernel shape now, not in the first request
        from model.warmup import precompile
        secs = precompile(stage, step_tokens, min(o.max_num_seqs, BUCKETS[-1]), max_len)
        if worker.is_last:
            worker.warm_sampler(cfg.vocab_size)
        if log:
            log(f"stage {rank}: compiled kernels for every shape class in {secs:.1f} s")
    if device.type == "cuda" and not o.enforce_eager:
        t1 = time.perf_counter()
        worker.capture_graphs(max_len, min(o.max_num_seqs, BUCKETS[-1]))
        if log:
            log(f"stage {rank}: captured decode graphs for batch sizes {worker.graphs.buckets} "
                f"in {time.perf_counter() - t1:.1f} s")
    if device.type == "cuda":
        worker.late.install()  # from here on, a Triton compile is a request paying JIT: counted in stats()
    info = {"num_blocks": blocks, "block_size": o.block_size, "max_model_len": max_len, "load_s": load_s,
            "layers": [spec.start, spec.end], "device": str(device),
            "kv_gib": blocks * stage.kv_bytes_per_block(o.block_size) / 2**30}
    if log:
        log(f"stage {rank}: layers {spec.start}..{spec.end - 1} on {device}, loaded in {load_s:.1f} s; "
            f"KV pool {blocks} blocks x {o.block_size} tokens ({info['kv_gib']:.2f} GiB)")
    engine = None
    if rank == 0:
        cost = StepCost(cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok)
        if o.max_step_ms:  # the bound in this card's time: stage 0's measured steps calibrate the fit
            share = (spec.end - spec.start) / cfg.num_hidden_layers
            worker.timer.on_step = lambda ms, tokens, pairs: cost.observe(ms, tokens, pairs, share)
        sched = Scheduler(BlockManager(blocks, o.block_size, o.enable_prefix_caching), o.max_num_seqs, o.max_num_batched_tokens,
                          max_len, o.stages, o.dynamic_chunks, o.max_step_ms, cost)
        engine = PipelineEngine(worker, sched, args.stop_ids, o.seed, o.async_scheduling, o.logprobs_mode,
                                Path(args.model_dir) / "tokenizer.json")
    return Rank(rank, worker, engine, info)


def init_distributed(rank: int, world: int, device: str, store_path: str | None = None) -> None:
    """Join the process group. store_path: the stages are all on this host (LLM started them) and
    meet through a FileStore there, so no rendezvous socket listens on any interface (a TCPStore
    binds every interface, whatever MASTER_ADDR says). Without it: env:// (torchrun's MASTER_ADDR)."""
    if world == 1 and not dist.is_available():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    store = dist.FileStore(store_path, world) if store_path is not None else None
    # Idle stages wait in recv between generate calls: a long timeout, and dead peers are ended by
    # the parent (LLM) or torchrun's agent instead.
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(hours=24), store=store,
                            **({"device_id": torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")}
                               if backend == "nccl" else {}))
