"""StageWorker: everything one pipeline rank does on its device: build the micro-batch metadata,
run its Stage, time it, sample on the last stage, and (ranks > 0) serve messages until STOP."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from model.batch import AttnBatch
from model.sampler import RowParams, sample
from model.stage import Stage

from .decode_graphs import DecodeGraphs
from .p2p import BATCH, STATS, STOP, Link


class StageTimer:
    """Busy time of the stage's forwards: CUDA events (resolved lazily), else the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.busy_ms: list[float] = []
        self.tokens: list[int] = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, started, num_tokens: int) -> None:
        self.tokens.append(num_tokens)
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.pending.append((started, e))
        else:
            self.busy_ms.append((time.perf_counter() - started) * 1e3)

    def collect(self, reset: bool) -> dict:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.busy_ms += [s.elapsed_time(e) for s, e in self.pending]
            self.pending = []
        out = {"busy_ms": sum(self.busy_ms), "steps": len(self.busy_ms), "tokens": sum(self.tokens),
               "step_ms": list(self.busy_ms), "step_tokens": list(self.tokens)}
        if reset:
            self.busy_ms, self.tokens = [], []
        return out


class StageWorker:
    def __init__(self, stage: Stage, rank: int, num_stages: int, block_size: int, fwd_group=None,
                 ret_group=None, seed: int = 0):
        self.stage, self.rank, self.num_stages, self.block_size = stage, rank, num_stages, block_size
        self.device = stage.device
        self.fwd = Link(fwd_group, self.device) if num_stages > 1 else None
        self.ret = Link(ret_group, self.device) if num_stages > 1 else None
        self.timer = StageTimer(self.device)
        self.graphs: DecodeGraphs | None = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1

    def forward(self, x: torch.Tensor, meta: dict) -> torch.Tensor:
        """Run the stage on one micro-batch: a captured graph for pure decode, else eager."""
        t = self.timer.start()
        ql = meta["query_lens"]
        if self.graphs is not None and len(ql) <= self.graphs.max_batch and max(ql) == 1:
            out = self.graphs.run(x, meta["context_lens"], meta["block_tables"])
        else:
            batch = AttnBatch.build(ql, meta["context_lens"], meta["block_tables"], self.block_size,
                                    meta["sample"], self.device)
            out = self.stage(x, batch)
        self.timer.stop(t, sum(ql))
        return out

    def sample(self, logits: torch.Tensor, meta: dict) -> torch.Tensor:
        rows = [RowParams(*r) for r in meta["rows"]]
        return sample(logits, rows, self.generator) if rows else torch.empty(0, dtype=torch.int64, device=self.device)

    def stats(self, reset: bool) -> dict:
        out = {"rank": self.rank, "layers": [self.stage.start, self.stage.end], **self.timer.collect(reset)}
        if self.device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["kv_gib"] = self.stage.kv_cache.numel() * self.stage.kv_cache.element_size() / 2**30
            if reset:
                torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def serve(self) -> None:
        """Ranks > 0: receive from the previous stage until STOP; forward or sample and return."""
        prev = self.rank - 1
        while True:
            msg = self.fwd.recv(prev)
            if msg.kind == STOP:
                if not self.is_last:
                    self.fwd.send(self.rank + 1, STOP, 0)
                    self.fwd.flush()
                return
            if msg.kind == STATS:
                stats = msg.meta["stats"] + [self.stats(msg.meta["reset"])]
                meta = {"stats": stats, "reset": msg.meta["reset"]}
                if self.is_last:
                    self.ret.send(0, STATS, msg.mb_id, None, meta)
                else:
                    self.fwd.send(self.rank + 1, STATS, msg.mb_id, None, meta)
                continue
            out = self.forward(msg.payload, msg.meta)
            if self.is_last:
                self.ret.send(0, BATCH, msg.mb_id, self.sample(out, msg.meta))
            else:
                self.fwd.send(self.rank + 1, BATCH, msg.mb_id, out, msg.meta)

    # ---- KV pool -----------------------------------------------------------------------------
    def size_kv_pool(self, kv_cache_gib: float | None, gpu_memory_utilization: float, warmup_tokens: int) -> int:
        """Blocks this stage can hold: an explicit budget, or on CUDA the free memory after a
        warm-up forward of `warmup_tokens` (activation peak kept in reserve) times the user fraction."""
        per_block = self.stage.kv_bytes_per_block(self.block_size)
        if kv_cache_gib is not None:
            return int(kv_cache_gib * 2**30 // per_block)
        if self.device.type != "cuda":
            return int(0.25 * 2**30 // per_block)  # CPU default: 256 MiB
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warmup(warmup_tokens)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        budget = total * gpu_memory_utilization - (total - free) - (peak - current)
        return max(0, int(budget // per_block))

    def _warmup(self, T: int) -> None:
        nblocks = -(-T // self.block_size)
        self.stage.allocate_kv(nblocks, self.block_size)
        meta = {"query_lens": [T], "context_lens": [T], "block_tables": [list(range(nblocks))], "sample": [True]}
        if self.stage.has_embed:
            x = torch.randint(0, self.stage.cfg.vocab_size, (T,), device=self.device)
        else:
            x = torch.randn(T, self.stage.cfg.hidden_size, device=self.device, dtype=self.stage.dtype) * 0.1
        self.forward(x, meta)
        self.stage.kv_cache = None
        self.timer.collect(reset=True)

    def allocate(self, num_blocks: int) -> None:
        """The pool plus one scratch block (id num_blocks) that padded graph rows write into."""
        self.stage.allocate_kv(num_blocks + 1, self.block_size)
        self.scratch_block = num_blocks

    def capture_graphs(self, max_model_len: int, max_batch: int) -> None:
        self.graphs = DecodeGraphs(self.stage, self.block_size, max_model_len, max_batch, self.scratch_block)
        self.timer.collect(reset=True)


def agree_min(value: int, device: torch.device) -> int:
    """The minimum of `value` over every rank (the pool is as large as the tightest stage allows)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
