"""Scheduler (no torch): continuous batching with chunked prefill under a per-step token budget,
mixed with decodes, several micro-batches in flight, preemption of the youngest sequence (blocks
freed, recomputed later) when KV blocks run out, and prefix caching (a sequence starts after the
longest prefix of its tokens already in the block manager's cache).

When a block is cached: once the micro-batch writing its last token has been dispatched, i.e. at
the end of the schedule() call that built that micro-batch (or, for a token sampled by a
continuation, when the token reaches the host). The caller dispatches each micro-batch before it
calls the scheduler again (PipelineEngine.step), so a sequence that finds the block does so in a
later call, and its micro-batch is dispatched after the writer's. Every stage runs micro-batches in
dispatch order (one stream, one receive order), so on every stage the write lands before the read.
A block is never offered to a sequence of the micro-batch that writes it: chunks of one micro-batch
do not see each other's KV writes on every attention backend.

Followers: a waiting sequence whose next uncached full block is one a running prefill will write
(the same new prefix arriving together, the n samples of one prompt) is passed over, keeping its
place, until the writer has cached it; it then starts after it. So a shared prefix is computed
once, and the samples of one prompt hold the same blocks. The writer's prefill is always
scheduled (running sequences come first), so a follower waits at most for it."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .chunking import ChunkSizer, StepBudget, StepCost
from .sequence import Sequence, Status


# Prompt positions of one micro-batch whose logits feed prompt_logprobs: the last stage holds those
# logits in fp32 ([rows, vocab]: 0.6 GB at 1024 rows of a 151,936 vocab) beyond the memory sized at
# start-up, so a long prompt asking for them is prefilled in chunks of at most this many tokens.
PROMPT_LOGPROB_ROWS = 1024


class RequestRefused(ValueError):
    """A request that can never fit: past the model's context or past the whole KV pool."""


@dataclass
class Chunk:
    seq: Sequence
    start: int  # first token position fed in this chunk
    length: int
    sample: bool  # the chunk ends at the sequence's last token: its next token gets sampled
    pending: int = 0  # a continuation: 1, its one token is the one still being sampled (not yet known)
    source_mb: int = 0  # a continuation: the micro-batch in flight that samples that token

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class MicroBatch:
    mb_id: int
    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def sampled(self) -> list[Sequence]:
        return [c.seq for c in self.chunks if c.sample]


def check_request(prompt_len: int, max_tokens: int, max_model_len: int, num_blocks: int, block_size: int) -> None:
    """Refuse, with the limit named, a request that could never run."""
    if prompt_len < 1:
        raise RequestRefused("empty prompt: give at least one token")
    total = prompt_len + max_tokens
    if total > max_model_len:
        raise RequestRefused(f"prompt of {prompt_len} tokens + max_tokens {max_tokens} = {total} exceeds the "
                             f"model's context of {max_model_len} tokens")
    if -(-total // block_size) > num_blocks:
        raise RequestRefused(f"prompt of {prompt_len} tokens + max_tokens {max_tokens} = {total} exceeds the "
                             f"whole KV cache of {num_blocks * block_size} tokens ({num_blocks} blocks)")


def cache_salts(cache_salt, n: int) -> list[str | None]:
    """One cache_salt per request from None, one salt, or a list of n (each a non-empty str or None)."""
    salts = list(cache_salt) if isinstance(cache_salt, (list, tuple)) else [cache_salt] * n
    if len(salts) != n:
        raise ValueError(f"{len(salts)} cache_salt values for {n} prompts")
    for s in salts:
        if s is not None and (not isinstance(s, str) or not s):
            raise ValueError(f"cache_salt must be a non-empty string if given, got {s!r}")
    return salts


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, num_stages: int = 1, dynamic_chunks: bool = True,
                 max_step_ms: float | None = None, step_cost: StepCost | None = None):
        """max_step_ms (with step_cost): while any sequence decodes, each micro-batch's prefill tokens
        are cut so that its modeled time (step_cost) stays within it (engine/runtime/chunking.py
        StepBudget); None or 0: only the token budget bounds a step."""
        self.blocks = blocks
        self.max_step_ms = max_step_ms if max_step_ms and step_cost is not None else None
        self.step_cost = step_cost
        # several stages: a prefill chunk's tokens shrink with its prefix so chunks cost alike
        self.chunk_sizer = ChunkSizer(max_num_batched_tokens, num_stages=num_stages) \
            if dynamic_chunks and num_stages > 1 else None
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.max_model_len, self.num_stages = max_model_len, num_stages
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_mb = 0
        self.num_preemptions = 0
        self.prompt_tokens = 0  # prompt tokens of admitted requests, since the last reset
        self.generation_tokens = 0  # tokens sampled, since the last reset
        self.continuations = 0  # decode steps queued before their input token was known (async), since reset
        self.dropped_tokens = 0  # tokens sampled by such steps for sequences that had stopped meanwhile
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the prefix cache, since reset
        self.prefix_cache_hits = 0  # of them, tokens found cached (not computed), since reset
        self.step_bound_cuts = 0  # prefill chunks shortened (or held back) by max_step_ms, since reset
        self.step_bound_over = 0  # steps max_step_ms left too little prefill, which took the budget's (StepBudget.over)
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence by id

    # ---- admission ---------------------------------------------------------------------------
    def check(self, prompt_len: int, max_tokens: int) -> None:
        check_request(prompt_len, max_tokens, self.max_model_len, self.blocks.num_blocks, self.blocks.block_size)

    def add(self, seq: Sequence) -> None:
        self.check(seq.prompt_len, seq.params.max_tokens)
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq
        self.prompt_tokens += seq.prompt_len

    def abort(self, seq_id: int) -> bool:
        """Drop a waiting or running sequence. Its blocks are freed now, or, while micro-batches
        holding it are in flight, when the last of them completes (its tokens are discarded)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return False
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status == Status.RUNNING:
            self.running.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        if seq.in_flight == 0:
            self.blocks.release(seq)
        return True

    def snapshot(self, reset: bool = False) -> dict:
        out = {"running": len(self.running), "waiting": len(self.waiting), "free_blocks": self.blocks.num_free,
               "num_blocks": self.blocks.num_blocks, "preemptions": self.num_preemptions,
               "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
               "continuations": self.continuations, "dropped_tokens": self.dropped_tokens,
               "prefix_cache_queries": self.prefix_cache_queries, "prefix_cache_hits": self.prefix_cache_hits,
               "cached_blocks": self.blocks.num_cached_idle, "prefix_cache_evictions": self.blocks.num_evicted,
               "step_bound_cuts": self.step_bound_cuts, "step_bound_over": self.step_bound_over}
        if self.max_step_ms is not None:  # the bound's calibration: measured over modeled step time
            out.update(step_cost_scale=self.step_cost.scale, step_cost_observed=self.step_cost.observed)
        if reset:
            self.num_preemptions = self.prompt_tokens = self.generation_tokens = 0
            self.continuations = self.dropped_tokens = 0
            self.prefix_cache_queries = self.prefix_cache_hits = self.blocks.num_evicted = self.step_bound_cuts = 0
            self.step_bound_over = 0
        return out

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block no sequence holds; True when nothing is cached any more."""
        return self.blocks.reset_cache()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one micro-batch ---------------------------------------------------------------------
    def schedule(self) -> MicroBatch | None:
        if self._decodes_would_split():
            return None
        budget, chunks = self.budget, []
        decode_cap, n_decode = self._decode_cap(), 0
        step = self._step_budget(decode_cap)
        lp_left = PROMPT_LOGPROB_ROWS  # prompt_logprobs rows left in this micro-batch
        for seq in list(self.running):
            if budget == 0:
                break
            if not seq.schedulable or seq.status != Status.RUNNING:
                continue
            is_decode = seq.num_scheduled >= seq.prompt_len
            if is_decode and n_decode >= decode_cap:
                continue
            n = min(seq.num_unscheduled, budget)
            if self.chunk_sizer is not None and not is_decode:
                n = min(n, self.chunk_sizer(seq.num_scheduled, seq.prompt_len))
            if step is not None and not is_decode and (n := self._bounded(step, seq.num_scheduled, n)) == 0:
                continue
            if not is_decode and (n := self._logprob_rows(seq, n, lp_left)) == 0:
                continue
            if not self._grow(seq, seq.num_scheduled + n, chunks):
                continue
            chunks.append(self._chunk(seq, n))
            budget -= n
            n_decode += is_decode
            if not is_decode and seq.params.prompt_logprobs is not None:
                lp_left -= n
        # keys running prefills will cache, built when first needed; the keys of sequences admitted
        # after that join it at the next need (a long prompt's keys are then hashed as it commits)
        writing, admitted, deferred = None, [], []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.lookup(seq)
            key = self.blocks.next_key(seq, len(hits))
            if key is not None:
                if writing is None:
                    writing = {k for s in self.running for k in self.blocks.prompt_keys_to_write(s)}
                else:
                    writing.update(k for s in admitted for k in self.blocks.prompt_keys_to_write(s))
                admitted.clear()
                if key in writing:  # another prefill writes the block next: follow it (computed once)
                    deferred.append(self.waiting.popleft())
                    continue
            start = len(hits) * self.blocks.block_size
            n = min(len(seq) - start, budget)
            if self.chunk_sizer is not None:
                n = min(n, self.chunk_sizer(start, seq.prompt_len))
            if step is not None and (n := self._bounded(step, start, n)) == 0:
                break
            if (n := self._logprob_rows(seq, n, lp_left)) == 0:  # its logits would not fit: later, in place
                deferred.append(self.waiting.popleft())
                continue
            if not self.blocks.admit(seq, hits, start + n):
                break
            seq.num_scheduled = seq.num_cached_tokens = start
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += start
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(self._chunk(seq, n))
            budget -= n
            if seq.params.prompt_logprobs is not None:
                lp_left -= n
            admitted.append(seq)
        self.waiting.extendleft(reversed(deferred))  # back at the front, in their order
        if not chunks:
            return None
        for c in chunks:  # the micro-batch is dispatched before the next call: its blocks are cached
            self.blocks.commit(c.seq, c.end)
        self._next_mb += 1
        return MicroBatch(self._next_mb, chunks)

    def schedule_continuation(self) -> MicroBatch | None:
        """Async scheduling: the next decode step of sequences whose current token is still being
        sampled (Sequence.can_continue). Its input id is fed on the device from the returned ids of
        the micro-batch that samples it (Chunk.pending; engine/runtime/pipeline.py), so the step is queued
        before that token reaches the host. No preemption for it: only free blocks are used.
        At most the decode cap's rows, as schedule() takes: on several stages the decodes then stay
        split in one group per stage, each stage running one group while the next stage runs
        another. Uncapped, every decode joined one continuation chained to the last, and the
        stages took turns (batch 16 on 2 stages ran no faster than on 1 GPU)."""
        if self.num_stages == 1 and any(self._free_decode(s) for s in self.running):
            return None  # it would leave those out: the two groups would then alternate (_decodes_would_split)
        chunks, budget = [], min(self.budget, self._decode_cap())
        for seq in self.running:
            if budget == 0:
                break
            if not seq.can_continue or len(seq) + 1 >= self.max_model_len:
                continue
            if not self.blocks.grow(seq, len(seq) + 1):
                continue
            chunks.append(self._chunk(seq, 1, pending=1))
            budget -= 1
            self.continuations += 1
        if not chunks:
            return None
        self._next_mb += 1
        return MicroBatch(self._next_mb, chunks)

    @staticmethod
    def _free_decode(seq: Sequence) -> bool:
        return seq.schedulable and seq.status == Status.RUNNING and seq.num_scheduled >= seq.prompt_len

    def _decodes_would_split(self) -> bool:
        """One stage, no prefill to schedule, some decoding sequences free and others still being
        sampled: a micro-batch now would hold only the free ones, and the two groups would then
        alternate for as long as they decode (each waiting while the other is in flight), every
        step reading all the weights for part of the batch. Waiting for the in-flight micro-batch
        instead lets the next one take them all. Several stages keep one group per stage on purpose
        (_decode_cap)."""
        if self.num_stages != 1 or self.waiting:
            return False
        free = awaiting = False
        for s in self.running:
            if s.status != Status.RUNNING:
                continue
            if s.num_scheduled < s.prompt_len and s.schedulable:
                return False  # a prefill chunk to run: schedule it (with the free decodes)
            free |= self._free_decode(s)
            awaiting |= s.awaiting_sample and s.num_scheduled >= s.prompt_len
        return free and awaiting

    def _step_budget(self, decode_cap: int) -> StepBudget | None:
        """The bound on this micro-batch's prefill tokens while some sequence decodes (None: no
        bound): it starts from the decodes schedule() will take (at most decode_cap schedulable
        ones; a decode at position p attends to p + 1 keys)."""
        if self.max_step_ms is None or not any(s.num_scheduled >= s.prompt_len for s in self.running):
            return None
        ctx = [s.num_scheduled + 1 for s in self.running
               if s.schedulable and s.status == Status.RUNNING and s.num_scheduled >= s.prompt_len][:decode_cap]
        return StepBudget(self.step_cost, self.max_step_ms, ctx)

    def _bounded(self, step: StepBudget, prefix: int, n: int) -> int:
        first = not step.prefilled  # the step's first chunk decides whether the bound holds for it
        m = step.take(prefix, n)
        self.step_bound_cuts += m < n
        self.step_bound_over += first and step.over and m > 0
        return m

    def _decode_cap(self) -> int:
        """Decode rows per micro-batch: the decoding sequences spread over the stages."""
        decoding = sum(1 for s in self.running if s.num_scheduled >= s.prompt_len)
        return math.ceil(decoding / self.num_stages)

    @staticmethod
    def _logprob_rows(seq: Sequence, n: int, left: int) -> int:
        """n, or for a prefill chunk asking for prompt_logprobs at most the `left` rows the
        micro-batch has for them (PROMPT_LOGPROB_ROWS in all)."""
        return n if seq.params.prompt_logprobs is None else min(n, left)

    def _chunk(self, seq: Sequence, n: int, pending: int = 0) -> Chunk:
        c = Chunk(seq, seq.num_scheduled, n, seq.num_scheduled + n == len(seq) + pending, pending,
                  seq.sample_mb if pending else 0)
        seq.num_scheduled += n
        seq.in_flight += 1
        if c.sample:
            seq.samples_in_flight += 1
            seq.sample_mb = self._next_mb + 1  # the id of the micro-batch being built
        return c

    def _grow(self, seq: Sequence, num_tokens: int, chunks: list[Chunk]) -> bool:
        """Blocks for seq, preempting the youngest idle sequences if needed (seq itself last)."""
        taken = {c.seq.seq_id for c in chunks}
        while not self.blocks.grow(seq, num_tokens):
            victims = [s for s in self.running if s.in_flight == 0 and s.seq_id not in taken and s is not seq]
            if victims:
                self._preempt(victims[-1])
                continue
            if seq.in_flight == 0:
                self._preempt(seq)
            return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.num_scheduled = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        # back in arrival order, ahead of younger waiting requests
        pos = next((i for i, w in enumerate(self.waiting) if w.seq_id > seq.seq_id), len(self.waiting))
        self.waiting.insert(pos, seq)

    # ---- results -----------------------------------------------------------------------------
    def complete(self, mb: MicroBatch, sampled: list[int]) -> list[Sequence]:
        """Apply the tokens sampled for mb (one per sampling chunk, in order). Returns the sequences
        that received a token; finished ones have released their blocks."""
        samplers = mb.sampled
        if len(sampled) != len(samplers):
            raise RuntimeError(f"micro-batch {mb.mb_id}: got {len(sampled)} tokens for {len(samplers)} samples")
        for c in mb.chunks:
            c.seq.in_flight -= 1
            if c.seq.finish_reason == "abort" and c.seq.in_flight == 0:
                self.blocks.release(c.seq)
        done = []
        for seq, tok in zip(samplers, sampled):
            seq.samples_in_flight -= 1
            if seq.status == Status.FINISHED:  # aborted, or stopped while its continuation was in flight
                self.dropped_tokens += seq.finish_reason != "abort"
                continue
            seq.append(int(tok), self.max_model_len)
            self.blocks.commit(seq, seq.num_scheduled)  # a continuation has written this token's KV
            self.generation_tokens += 1
            done.append(seq)
            if seq.finish_reason is not None:
                # released now even with a continuation in flight: every stage runs micro-batches
                # in order, so its stray KV write lands before a later owner of the block writes
                seq.status = Status.FINISHED
                self.blocks.release(seq)
                self.running.remove(seq)
                self.seqs.pop(seq.seq_id, None)
        return done
