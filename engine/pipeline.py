"""PipelineEngine (rank 0): owns the scheduler, builds each micro-batch's plan once, keeps up to S
micro-batches in flight through the S stages, and turns the tokens the last stage sends back into
per-request events. A stats request travels down the pipeline behind the micro-batches already in
flight, so it never disturbs them."""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import torch

from .p2p import BATCH, STATS, STOP, to_device
from .params import SamplingParams
from .scheduler import MicroBatch, Scheduler
from .sequence import Sequence
from .stage_worker import STATS_BYTES, StageWorker, stats_buffer
from .step_plan import H_AUX0, H_AUX1, H_KIND, HEADER, PlanView, build_plan

Event = tuple[int, int, str | None]  # (request id, new token, finish reason or None)


class _Returns:
    """Sampled ids coming back from the last stage: irecvs posted at dispatch, waited on a side
    stream so that reading them never waits for stage 0's own next forward."""

    def __init__(self, worker: StageWorker):
        self.worker = worker
        self.cuda = worker.device.type == "cuda"
        self.stream = torch.cuda.Stream(worker.device) if self.cuda else None

    def post(self, tensor: torch.Tensor):
        return self.worker.ret.irecv(self.worker.num_stages - 1, tensor)

    def read(self, work, tensor: torch.Tensor) -> torch.Tensor:
        if work is None:
            return tensor.cpu()
        if not self.cuda:
            work.wait()
            return tensor
        with torch.cuda.stream(self.stream):
            work.wait()  # the side stream waits for the receive, not for stage 0's compute
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()
        return host


class PipelineEngine:
    def __init__(self, worker: StageWorker, scheduler: Scheduler, default_stop_ids: tuple[int, ...], seed: int = 0):
        self.worker, self.scheduler = worker, scheduler
        self.num_stages = worker.num_stages
        self.default_stop_ids = default_stop_ids
        self.seed = seed
        # (micro-batch, (work, tensor) of its returning ids) or ("stats", token, (work, buffer))
        self.inflight: deque = deque()
        self.replies: list = []
        self.returns = _Returns(worker) if self.num_stages > 1 else None

    def add(self, seq_id: int, prompt: list[int], params: SamplingParams) -> None:
        stop = params.stop_token_ids if params.stop_token_ids is not None else self.default_stop_ids
        self.scheduler.add(Sequence(seq_id, prompt, params, tuple(stop)))

    def abort(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.scheduler.abort(sid)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.inflight)

    def step(self) -> list[Event]:
        """Fill the pipeline, then take the oldest micro-batch's tokens (or stats reply)."""
        tr = self.worker.tracer
        while sum(1 for e in self.inflight if isinstance(e[0], MicroBatch)) < self.num_stages:
            t = tr.host_start()
            mb = self.scheduler.schedule()
            if mb is None:
                break
            if t is not None:
                tr.host_end(t, "schedule", {"mb": mb.mb_id, "tokens": sum(c.length for c in mb.chunks),
                                            "rows": len(mb.chunks)})
            self._dispatch(mb)
        if not self.inflight:
            return []
        entry = self.inflight.popleft()
        if entry[0] == "stats":
            _, token, own, (work, buf) = entry
            raw = self.returns.read(work, buf)
            n = int(raw.nonzero().max()) + 1 if raw.any() else 0
            self.replies.append(("stats", token, {"stages": json.loads(bytes(raw[:n].numpy()).decode()),
                                                  "scheduler": own}))
            return []
        mb, (work, ids) = entry
        t = tr.host_start()
        tokens = self.returns.read(work, ids).tolist() if self.returns else ids.tolist()
        if t is not None:
            tr.host_end(t, "wait", {"mb": mb.mb_id})
        seqs = self.scheduler.complete(mb, tokens)
        return [(s.seq_id, s.token_ids[-1], s.finish_reason) for s in seqs]

    def _dispatch(self, mb: MicroBatch) -> None:
        header, plan = build_plan(BATCH, mb.mb_id, mb.chunks, self.scheduler.blocks.block_size, self.seed)
        dev_plan = to_device(plan, self.worker.device)
        view = PlanView(header.tolist(), dev_plan)
        if self.num_stages > 1:
            # header and plan go ahead of the forward: the next stage receives them, prepares its
            # metadata and queues its launch while this stage computes; only the hidden states wait
            self.worker.fwd.send(1, header, [dev_plan])
        out = self.worker.forward(view.part("ids"), view)
        if self.num_stages == 1:
            ids = self.worker.sample(out, view) if view.R else torch.empty(0, dtype=torch.int64)
            self.inflight.append((mb, (None, ids)))
            return
        t = self.worker.tracer.host_start()
        self.worker.fwd.send(1, None, [out])
        if t is not None:
            self.worker.tracer.host_end(t, "send", {"mb": mb.mb_id, "to": 1})
        ids = torch.empty(view.R, dtype=torch.int64, device=self.worker.device)
        self.inflight.append((mb, (self.returns.post(ids), ids)))

    # ---- stats -------------------------------------------------------------------------------
    def request_stats(self, token: int, reset: bool, per_step: bool, profile: dict | None = None) -> None:
        """Queue a stats reply ("stats", token, snapshot) for take_replies(): the scheduler and
        stage 0 now, every later stage when the request reaches it behind the work in flight."""
        own = self.scheduler.snapshot(reset)
        done = self.worker.profiler.apply(profile)  # LLM.start_profile / stop_profile
        stage0 = {**self.worker.stats(reset, per_step), **done}
        if profile:
            stage0["profile"] = profile  # the later stages read their command from stage 0's entry
        if self.num_stages == 1:
            self.replies.append(("stats", token, {"stages": [stage0], "scheduler": own}))
            return
        header = np.zeros(HEADER, dtype=np.int64)
        header[H_KIND] = STATS
        header[H_AUX0] = len(json.dumps([stage0]).encode())
        header[H_AUX1] = int(reset) | (int(per_step) << 1)
        self.worker.fwd.send(1, header, [stats_buffer([stage0], self.worker.device)])
        buf = torch.empty(STATS_BYTES, dtype=torch.uint8, device=self.worker.device)
        self.inflight.append(("stats", token, own, (self.returns.post(buf), buf)))

    def take_replies(self) -> list:
        out, self.replies = self.replies, []
        return out

    def shutdown(self) -> None:
        if self.num_stages > 1:
            header = np.zeros(HEADER, dtype=np.int64)
            header[H_KIND] = STOP
            self.worker.fwd.send(1, header, [])
            self.worker.fwd.flush()
