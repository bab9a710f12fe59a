"""PipelineEngine (rank 0): owns the scheduler, keeps up to S micro-batches in flight through the
S stages, and turns the tokens the last stage sends back into per-request events."""
from __future__ import annotations

from collections import deque

import torch

from .p2p import BATCH, STATS, STOP
from .params import SamplingParams
from .scheduler import MicroBatch, Scheduler
from .sequence import Sequence
from .stage_worker import StageWorker

Event = tuple[int, int, str | None]  # (request id, new token, finish reason or None)


class PipelineEngine:
    def __init__(self, worker: StageWorker, scheduler: Scheduler, default_stop_ids: tuple[int, ...]):
        self.worker, self.scheduler = worker, scheduler
        self.num_stages = worker.num_stages
        self.default_stop_ids = default_stop_ids
        self.inflight: deque[tuple[MicroBatch, torch.Tensor | None]] = deque()

    def add(self, request_id: int, prompt: list[int], params: SamplingParams) -> None:
        stop = params.stop_token_ids if params.stop_token_ids is not None else self.default_stop_ids
        self.scheduler.add(Sequence(request_id, prompt, params, tuple(stop)))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.inflight)

    def step(self) -> list[Event]:
        """Fill the pipeline, then wait for the oldest micro-batch's tokens."""
        while len(self.inflight) < self.num_stages:
            mb = self.scheduler.schedule()
            if mb is None:
                break
            self._dispatch(mb)
        if not self.inflight:
            return []
        mb, local = self.inflight.popleft()
        if local is not None:
            tokens = local.tolist()
        else:
            msg = self.worker.ret.recv(self.num_stages - 1)
            if msg.kind != BATCH or msg.mb_id != mb.mb_id:
                raise RuntimeError(f"pipeline out of order: expected micro-batch {mb.mb_id}, got {msg.mb_id}")
            tokens = msg.payload.tolist() if msg.payload is not None else []
        seqs = self.scheduler.complete(mb, tokens)
        return [(s.seq_id, s.token_ids[-1], s.finish_reason) for s in seqs]

    def _dispatch(self, mb: MicroBatch) -> None:
        bs = self.scheduler.blocks.block_size
        ids, meta = [], {"query_lens": [], "context_lens": [], "block_tables": [], "sample": [], "rows": []}
        for c in mb.chunks:
            s = c.seq
            ids += s.token_ids[c.start:c.end]
            meta["query_lens"].append(c.length)
            meta["context_lens"].append(c.end)
            meta["block_tables"].append(s.block_table[:-(-c.end // bs)])
            meta["sample"].append(c.sample)
            if c.sample:
                p = s.params
                meta["rows"].append((p.temperature, p.top_k, p.top_p, p.seed, len(s.output_ids)))
        x = torch.tensor(ids, dtype=torch.int64).to(self.worker.device, non_blocking=True)
        out = self.worker.forward(x, meta)
        if self.num_stages == 1:
            self.inflight.append((mb, self.worker.sample(out, meta)))
        else:
            self.worker.fwd.send(1, BATCH, mb.mb_id, out, meta)
            self.inflight.append((mb, None))

    def stats(self, reset: bool = False) -> list[dict]:
        """Busy time of every stage since the last reset (drains the pipeline first)."""
        own = self.worker.stats(reset)
        own["preemptions"] = self.scheduler.num_preemptions
        if self.num_stages == 1:
            return [own]
        self.worker.fwd.send(1, STATS, 0, None, {"stats": [own], "reset": reset})
        return self.worker.ret.recv(self.num_stages - 1).meta["stats"]

    def shutdown(self) -> None:
        if self.num_stages > 1:
            self.worker.fwd.send(1, STOP, 0)
            self.worker.fwd.flush()
