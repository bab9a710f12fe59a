"""CUDA graphs of one stage's decode forward (one token per sequence), one graph per batch-size
bucket, sharing one memory pool. A decode layer is a dozen small kernels whose launch gaps cost
about as much as their bytes eagerly, so replaying a captured graph is most of the decode speed. The graphs' static inputs are
filled from the step plan by the same fill_batch as eager steps; padding rows of a bucket write
their k/v into a scratch block that no sequence owns."""
from __future__ import annotations

import torch

from model.batch import AttnBatch
from model.stage import Stage

from .step_plan import H_MAXCTX, BatchBuffers, PlanView, decode_plan, fill_batch

# Past 256 (the default max_num_seqs) every 64 rows, up to 512: a larger max_num_seqs runs its
# decodes past 512 rows eager.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)


def graph_buckets(max_batch: int) -> list[int]:
    """The batch sizes captured for max_batch decoding sequences: BUCKETS below it, then max_batch
    itself (at most BUCKETS[-1]; larger decodes run eager)."""
    top = min(max_batch, BUCKETS[-1])
    return [b for b in BUCKETS if b < top] + [top]


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest captured batch size that holds n rows (n <= buckets[-1])."""
    return next(b for b in buckets if b >= n)


class DecodeGraphs:
    def __init__(self, stage: Stage, block_size: int, max_model_len: int, max_batch: int, scratch_block: int):
        self.stage, self.block_size, self.scratch = stage, block_size, scratch_block
        self.buckets = graph_buckets(max_batch)
        B, dev = self.buckets[-1], stage.device
        M = -(-max_model_len // block_size)
        self.max_blocks = M
        self.x = (torch.zeros(B, dtype=torch.int64, device=dev) if stage.has_embed
                  else torch.zeros(B, stage.cfg.hidden_size, dtype=stage.dtype, device=dev))
        i32, i64 = torch.int32, torch.int64
        self.buf = BatchBuffers(
            positions=torch.zeros(B, dtype=i64, device=dev),
            slots=torch.full((B,), scratch_block * block_size, dtype=i64, device=dev),
            query_start=torch.arange(B + 1, dtype=i32, device=dev),
            context_lens=torch.ones(B, dtype=i32, device=dev),
            block_tables=torch.full((B, M), scratch_block, dtype=i32, device=dev),
            logits_indices=torch.arange(B, dtype=i64, device=dev))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outs: dict[int, torch.Tensor] = {}
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
        u = self.buf
        return AttnBatch(u.positions[:b], u.slots[:b], u.block_tables[:b], u.query_start[:b + 1],
                         u.context_lens[:b], u.logits_indices[:b], query_lens=[1] * b, context_lens=[max_len] * b,
                         max_query_len=1, max_context=max_len)

    def fits(self, view: PlanView) -> bool:
        return view.decode_only and view.B <= self.max_batch and view.M <= self.max_blocks

    def run(self, x: torch.Tensor, view: PlanView, tables: list[list[int]] | None = None,
            copy: bool = True) -> torch.Tensor:
        """x: token ids [n] or hidden [n, H] of the plan's n decoding sequences; returns the stage's
        output for those n rows: a copy, as the graph's buffers are reused by the next replay, or
        with copy=False a view of them, for a caller that consumes it in this stream before the
        next replay is queued (the last stage's sampler: the fp32 logits are R x V).
        (x, context_lens, tables) lists are accepted too, for benchmarks that drive a stage."""
        if tables is not None:
            header, plan = decode_plan(list(view), tables, self.block_size)
            view = PlanView(header.tolist(), torch.from_numpy(plan).to(self.stage.device))
        n = view.B
        b = bucket_for(self.buckets, n)
        assert view.header[H_MAXCTX] <= self.max_blocks * self.block_size
        u = self.buf
        sub = BatchBuffers(u.positions[:b], u.slots[:b], u.query_start[:b + 1], u.context_lens[:b],
                           u.block_tables[:b], u.logits_indices[:b])
        fill_batch(view, sub, pad_slot=self.scratch * self.block_size, pad_block=self.scratch)
        self.x[:n].copy_(x)
        self.graphs[b].replay()
        return self.outs[b][:n].clone() if copy else self.outs[b][:n]
