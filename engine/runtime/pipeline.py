"""PipelineEngine (rank 0): owns the scheduler, builds each micro-batch's plan once, keeps up to S
micro-batches in flight through the S stages, and turns the tokens the last stage sends back into
per-request events. A stats request travels down the pipeline behind the micro-batches already in
flight, so it never disturbs them."""
from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from model.sampler_logprobs import width

from ..params import SamplingParams
from ..structured.requests import GrammarPayload
from ..structured.rows import GrammarRows
from .channel import BATCH, Stats, Stop, to_device
from .sampling_plan import SamplingExtras, SamplingPlanner
from .scheduler import MicroBatch, RequestRefused, Scheduler
from .sequence import Sequence
from .stage_worker import StageWorker
from .step_plan import H_LPK, PlanView, build_plan

# (sequence id, new token, finish reason or None, extra): extra is None, or a dict with "logprobs":
# the token's (logprob, rank, top ids, top logprobs), and on a sequence's first token
# "prompt_logprobs": one such tuple per prompt token after the first
Event = tuple[int, int, str | None, dict | None]


class _Sampled:
    """The ids sampled for one micro-batch in flight, on stage 0's device: the last stage's reply
    (an irecv posted at dispatch) or, on one stage, the sampler's output. A continuation gathers
    from them on the device; the host reads them when the micro-batch completes."""

    def __init__(self, ids: torch.Tensor, work, rows: dict[int, int], local: bool = False,
                 extras: SamplingExtras | None = None, table: torch.Tensor | None = None, table_work=None):
        self.ids, self.work, self.rows = ids, work, rows  # rows: seq id -> row of ids
        self.extras, self.table, self.table_work = extras, table, table_work  # the logprob table, if asked
        self.host = self.done = None
        if local and ids.is_cuda:  # one stage: copy now, before the next micro-batch is queued
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        self.waited = False

    def ready_on_device(self) -> None:
        """Make the current stream wait for the ids (NCCL: a stream wait; gloo: the host waits once)."""
        if self.work is not None and (self.ids.is_cuda or not self.waited):
            self.work.wait()
            self.waited = True


class _Returns:
    """Sampled ids coming back from the last stage: irecvs posted at dispatch, waited on a side
    stream so that reading them never waits for stage 0's own next forward."""

    def __init__(self, worker: StageWorker):
        self.worker = worker
        self.cuda = worker.device.type == "cuda"
        self.stream = torch.cuda.Stream(worker.device) if self.cuda else None

    def post(self, tensor: torch.Tensor):
        return self.worker.channel.post_return(tensor)

    def read(self, work, tensor: torch.Tensor, waited: bool = False) -> torch.Tensor:
        if work is None:
            return tensor.cpu()
        if not self.cuda:
            if not waited:
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
    def __init__(self, worker: StageWorker, scheduler: Scheduler, default_stop_ids: tuple[int, ...], seed: int = 0,
                 async_scheduling: bool = True, logprobs_mode: str = "raw_logprobs",
                 tokenizer_json: Path | None = None):
        self.worker, self.scheduler = worker, scheduler
        self.vocab = worker.stage.cfg.vocab_size
        # structured output: the matchers of structured sequences (xgrammar is imported at the first)
        self.grammar = GrammarRows(tokenizer_json, self.vocab, default_stop_ids)
        self.planner = SamplingPlanner(scheduler.max_num_seqs, self.vocab, logprobs_mode)
        self.prompt_lps: dict[int, list] = {}  # seq id -> prompt logprobs gathered, until its first token
        self.num_stages = worker.num_stages
        self.default_stop_ids = default_stop_ids
        self.seed = seed
        # Async scheduling: when the micro-batches normally schedulable do not fill the pipeline, a
        # decode's next step is queued before its token reaches the host (Scheduler.
        # schedule_continuation), its id gathered on the device. One stage then keeps two in flight.
        self.async_scheduling = async_scheduling
        self.max_in_flight = max(self.num_stages, 2) if async_scheduling else self.num_stages
        # (micro-batch, _Sampled) or ("stats", token, scheduler snapshot): the last stage's Stats reply
        # comes back on the channel in this order
        self.inflight: deque = deque()
        self.sampled: dict[int, _Sampled] = {}  # micro-batch id -> its sampled ids, while in flight
        self.replies: list = []
        self.returns = _Returns(worker) if self.num_stages > 1 else None

    def add(self, seq_id: int, prompt: list[int], params: SamplingParams, cache_salt: str | None = None,
            grammar: GrammarPayload | None = None) -> None:
        """Queue a request; grammar: its compiled structured_outputs (engine/structured/requests.py)."""
        stop = params.stop_token_ids if params.stop_token_ids is not None else self.default_stop_ids
        seq = Sequence(seq_id, prompt, params, tuple(stop), cache_salt)
        try:
            params.check_vocab(self.vocab)
            self.scheduler.check(seq.prompt_len, params.max_tokens)
            if grammar is not None:
                self.grammar.attach(seq, grammar)
        except ValueError as e:
            self.grammar.release(seq_id)
            raise RequestRefused(str(e)) from None
        self.scheduler.add(seq)

    def abort(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.scheduler.abort(sid)
            self.planner.release(sid)
            self.prompt_lps.pop(sid, None)
            self.grammar.release(sid)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.inflight)

    def step(self) -> list[Event]:
        """Fill the pipeline, then take the oldest micro-batch's tokens (or stats reply)."""
        tr = self.worker.tracer
        while sum(1 for e in self.inflight if isinstance(e[0], MicroBatch)) < self.max_in_flight:
            t = tr.host_start()
            mb = self.scheduler.schedule()
            if mb is None and self.async_scheduling:
                mb = self.scheduler.schedule_continuation()
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
            _, token, own = entry
            reply = self.worker.channel.recv_ctrl()
            self.replies.append(("stats", token, {"stages": reply.stages, "scheduler": own}))
            return []
        mb, got = entry
        del self.sampled[mb.mb_id]
        t = tr.host_start()
        if self.returns:
            tokens = self.returns.read(got.work, got.ids, got.waited).tolist()
        elif got.done is not None:
            got.done.synchronize()
            tokens = got.host.tolist()
        else:
            tokens = got.ids.tolist()
        table = self._table(got)
        if t is not None:
            tr.host_end(t, "wait", {"mb": mb.mb_id})
        seqs = self.scheduler.complete(mb, tokens)  # structured sequences' matchers accept their tokens
        if self.grammar.matchers:
            self.grammar.release_finished(seqs)
        if table is None and got.extras is None:
            return [(s.seq_id, s.token_ids[-1], s.finish_reason, None) for s in seqs]
        return self._events(seqs, got, table)

    def _table(self, got: _Sampled) -> list[list[float]] | None:
        if got.table is None:
            return None
        if self.returns:
            return self.returns.read(got.table_work, got.table).tolist()
        return got.table.cpu().tolist()

    def _events(self, seqs: list[Sequence], got: _Sampled, table: list[list[float]] | None) -> list[Event]:
        """Events with the logprobs asked; prompt logprobs gathered until a sequence's first token."""
        from model.sampler_logprobs import unpack_row
        ex = got.extras
        R = len(ex.row_k)
        if table is not None:
            for (sid, k), row in zip(ex.prompt_owners, table[R:]):
                self.prompt_lps.setdefault(sid, []).append(unpack_row(row, k))
        out = []
        for s in seqs:
            extra = {}
            r = got.rows[s.seq_id]
            if table is not None and ex.row_k[r] >= 0:
                extra["logprobs"] = unpack_row(table[r], ex.row_k[r])
            if s.params.prompt_logprobs is not None and len(s.output_ids) == 1:
                extra["prompt_logprobs"] = self.prompt_lps.pop(s.seq_id, [])
            if s.finish_reason is not None:
                self.planner.release(s.seq_id)
                self.prompt_lps.pop(s.seq_id, None)
            out.append((s.seq_id, s.token_ids[-1], s.finish_reason, extra or None))
        return out

    def _dispatch(self, mb: MicroBatch) -> None:
        sources, fed = self._sources(mb)
        extras = self.planner.prepare(mb.chunks)
        mask = self.grammar.bitmask(mb.chunks) if self.grammar.matchers else None
        header, plan = build_plan(BATCH, mb.mb_id, mb.chunks, self.scheduler.blocks.block_size, self.seed, fed,
                                  extras, mask)
        dev_plan = to_device(plan, self.worker.device)
        view = PlanView(header.tolist(), dev_plan, host=plan)
        if self.num_stages > 1:
            # header and plan go ahead of the forward: the next stage receives them, prepares its
            # metadata and queues its launch while this stage computes; only the hidden states wait
            self.worker.channel.send_batch(view)
        x = view.part("ids")
        if sources:  # a continuation: its ids are the returned ids of micro-batches still in flight
            for got in sources:
                got.ready_on_device()
            src = sources[0].ids if len(sources) == 1 else torch.cat([g.ids for g in sources])
            x = src.index_select(0, x)
        sampled = self.worker.run(x, view)  # the step every rank runs (engine/runtime/stage_worker.py)
        rows = {c.seq.seq_id: i for i, c in enumerate(c for c in mb.chunks if c.sample)}
        if self.num_stages == 1:
            ids, table = sampled if sampled is not None else (torch.empty(0, dtype=torch.int64), None)
            self._in_flight(mb, _Sampled(ids, None, rows, True, extras, table))
            return
        ids = torch.empty(view.R, dtype=torch.int64, device=self.worker.device)
        work = self.returns.post(ids)  # the last stage sends the ids, then the logprob table
        table = table_work = None
        if header[H_LPK]:
            table = torch.empty(view.R + view.P, width(header[H_LPK] - 1), dtype=torch.float32,
                                device=self.worker.device)
            table_work = self.returns.post(table)
        self._in_flight(mb, _Sampled(ids, work, rows, False, extras, table, table_work))

    def _in_flight(self, mb: MicroBatch, got: _Sampled) -> None:
        self.inflight.append((mb, got))
        self.sampled[mb.mb_id] = got

    def _sources(self, mb: MicroBatch) -> tuple[list[_Sampled], list[int] | None]:
        """A continuation's sources (the micro-batches in flight that sample its ids, in order) and,
        per chunk, the index of its id in their concatenated ids."""
        if not mb.chunks[0].pending:
            return [], None
        offset: dict[int, int] = {}
        sources: list[_Sampled] = []
        fed = []
        for c in mb.chunks:
            got = self.sampled[c.source_mb]
            if c.source_mb not in offset:
                offset[c.source_mb] = sum(g.ids.numel() for g in sources)
                sources.append(got)
            fed.append(offset[c.source_mb] + got.rows[c.seq.seq_id])
        return sources, fed

    # ---- stats -------------------------------------------------------------------------------
    def request_stats(self, token: int, reset: bool, per_step: bool, profile: dict | None = None) -> None:
        """Queue a stats reply ("stats", token, snapshot) for take_replies(): the scheduler and
        stage 0 now, every later stage when the request reaches it behind the work in flight."""
        own = {**self.scheduler.snapshot(reset), "grammar_matchers": len(self.grammar.matchers)}
        msg = Stats(reset, per_step, profile)
        self.worker.add_stats(msg)  # stage 0's, as every stage adds its own (StageWorker.serve)
        if self.num_stages == 1:
            self.replies.append(("stats", token, {"stages": msg.stages, "scheduler": own}))
            return
        self.worker.channel.send_ctrl(msg)
        self.inflight.append(("stats", token, own))

    def take_replies(self) -> list:
        out, self.replies = self.replies, []
        return out

    def shutdown(self) -> None:
        if self.num_stages > 1:
            self.worker.channel.send_ctrl(Stop())
            self.worker.channel.flush()
