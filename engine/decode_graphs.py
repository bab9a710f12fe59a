"""CUDA graphs of one stage's decode forward (one token per sequence), one graph per batch-size
bucket, sharing one memory pool. Launch overhead dominates eager decode (~75 small kernels per
layer), so replaying a captured graph is most of the decode speed. Padding rows of a bucket write
their k/v into a scratch block that no sequence owns."""
from __future__ import annotations

import numpy as np
import torch

from model.batch import AttnBatch
from model.stage import Stage

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, stage: Stage, block_size: int, max_model_len: int, max_batch: int, scratch_block: int):
        self.stage, self.block_size, self.scratch = stage, block_size, scratch_block
        self.buckets = [b for b in BUCKETS if b < max_batch] + [min(max_batch, BUCKETS[-1])]
        B, dev = self.buckets[-1], stage.device
        M = -(-max_model_len // block_size)
        self.x = (torch.zeros(B, dtype=torch.int64, device=dev) if stage.has_embed
                  else torch.zeros(B, stage.cfg.hidden_size, dtype=stage.dtype, device=dev))
        self.meta = torch.zeros(3, B, dtype=torch.int64, device=dev)  # positions, slots, context lens
        self.tables = torch.full((B, M), scratch_block, dtype=torch.int32, device=dev)
        self.ctx32 = torch.ones(B, dtype=torch.int32, device=dev)
        self.qstart = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(B, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outs: dict[int, torch.Tensor] = {}
        self._fill([0], [1], [[scratch_block]], B)  # padding everywhere for the captures
        pool = None
        for b in reversed(self.buckets):  # largest first: the shared pool is sized once
            batch = self._batch(b, max_model_len)
            stage(self.x[:b], batch)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outs[b] = stage(self.x[:b], batch)
            pool = g.pool()
            self.graphs[b] = g
        self.max_batch = B

    def _batch(self, b: int, max_len: int) -> AttnBatch:
        return AttnBatch(positions=self.meta[0, :b], slot_mapping=self.meta[1, :b], block_tables=self.tables[:b],
                         query_start=self.qstart[:b + 1], context_lens_t=self.ctx32[:b], query_lens=[1] * b,
                         context_lens=[max_len] * b, logits_indices=self.rows[:b])

    def _fill(self, positions: list[int], context_lens: list[int], tables: list[list[int]], b: int) -> None:
        n = len(context_lens)
        host = np.zeros((3, b), dtype=np.int64)
        host[0, :n] = positions
        host[1, :] = self.scratch * self.block_size  # padding rows: the scratch block
        host[2, :] = 1
        host[2, :n] = context_lens
        pos = np.asarray(positions, dtype=np.int64)
        host[1, :n] = [t[p // self.block_size] * self.block_size + p % self.block_size
                       for t, p in zip(tables, pos.tolist())]
        m = max(len(t) for t in tables)
        tab = np.full((b, m), self.scratch, dtype=np.int32)
        for i, t in enumerate(tables):
            tab[i, :len(t)] = t
        self.meta[:, :b].copy_(torch.from_numpy(host), non_blocking=True)
        self.ctx32[:b].copy_(self.meta[2, :b])
        self.tables[:b, :m].copy_(torch.from_numpy(tab), non_blocking=True)

    def run(self, x: torch.Tensor, context_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """x: token ids [n] or hidden [n, H] of n decoding sequences; returns the stage's output
        for those n rows (a copy: the graph's buffers are reused by the next replay)."""
        n = len(context_lens)
        b = next(s for s in self.buckets if s >= n)
        self._fill([c - 1 for c in context_lens], context_lens, tables, b)
        self.x[:n].copy_(x)
        self.graphs[b].replay()
        return self.outs[b][:n].clone()
