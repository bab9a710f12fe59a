"""Sequence: one request's tokens, its KV blocks and where it stands in the pipeline (no torch)."""
from __future__ import annotations

from enum import Enum

from ..params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, stop_ids: tuple[int, ...],
                 cache_salt: str | None = None):
        self.seq_id = seq_id
        self.prompt_len = len(prompt)
        self.token_ids = list(prompt)
        self.params = params
        self.stop_ids = frozenset(() if params.ignore_eos else stop_ids)
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.cache_salt = cache_salt  # prefix-cache isolation: only sequences of the same salt share blocks
        self.block_hashes: list[bytes] = []  # prefix keys of its full blocks (engine/runtime/block_manager.py)
        self.num_committed_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at its latest admission
        self.num_scheduled = 0  # tokens already sent down the pipeline (their KV is or will be cached)
        self.in_flight = 0  # micro-batches in flight that hold this sequence
        self.samples_in_flight = 0  # micro-batches in flight that sample this sequence's next tokens
        self.sample_mb = 0  # the latest of them (a continuation's ids come from its returned ids)
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # structured output: its grammar state (engine/structured/matcher.py StructuredMatcher),
        # advanced with every token on stage 0; kept across preemption (the tokens are kept too)
        self.matcher = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_unscheduled(self) -> int:
        return len(self.token_ids) - self.num_scheduled

    @property
    def awaiting_sample(self) -> bool:
        return self.samples_in_flight > 0

    @property
    def schedulable(self) -> bool:
        return self.status != Status.FINISHED and not self.awaiting_sample and self.num_unscheduled > 0

    @property
    def can_continue(self) -> bool:
        """Its next decode step may be scheduled before its pending token is known: exactly one
        sample in flight, every known token scheduled, and that token cannot end it by length
        (a stop token still can: the continuation's token is then dropped). Never a structured
        sequence: its next step's bitmask is the grammar's state after the pending token."""
        return (self.status == Status.RUNNING and self.samples_in_flight == 1 and self.matcher is None
                and self.num_scheduled == len(self.token_ids) >= self.prompt_len
                and len(self.output_ids) + 1 < self.params.max_tokens)

    def append(self, token: int, max_model_len: int) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        self.token_ids.append(token)
        if self.matcher is not None and (not self.matcher.accept(token) or self.matcher.is_terminated):
            self.finish_reason = "stop"  # the grammar is complete (or, masked rows all -inf, refused it)
        elif token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens or len(self.token_ids) >= max_model_len:
            self.finish_reason = "length"
