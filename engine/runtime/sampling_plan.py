"""Stage 0's side of the sampling extras (no torch): per micro-batch, the fields of the sampled
rows that ask for penalties or logprobs, the sparse logit additions (logit_bias; min_tokens' -inf
on stop tokens), the penalty slots to (re)start on the last stage, and the prompt positions
whose next token's logprob is asked (prompt_logprobs). Rows that ask for none of these add
nothing to the plan.

Penalty slots: a sequence with penalties gets one of `num_slots` slots the first time it is
planned, and again after a preemption (it is then re-filled from the tokens known here: every
output is known, as a sequence is only preempted with nothing in flight). A slot is freed when
its sequence finishes or is aborted; micro-batches run in order on every stage, so its last use
lands before the next owner's reset. When none is free, one of a preempted (waiting) sequence
is taken back: at most num_slots sequences run at once."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..params import SamplingParams

PROCESSED = "processed_logprobs"


@dataclass
class SamplingExtras:
    row_fields: list[tuple] = field(default_factory=list)  # per sampled row: pack_rows' trailing fields
    bias: list[tuple[int, int, float]] = field(default_factory=list)  # (row, token, value)
    resets: list[int] = field(default_factory=list)
    prompt_pairs: list[tuple[int, int]] = field(default_factory=list)  # (slot, prompt token)
    output_pairs: list[tuple[int, int]] = field(default_factory=list)  # (slot, output token)
    prompt_positions: list[int] = field(default_factory=list)  # token index in the micro-batch
    prompt_targets: list[int] = field(default_factory=list)  # the next prompt token there
    prompt_owners: list[tuple[int, int]] = field(default_factory=list)  # (seq id, top-k) per prompt row
    row_k: list[int] = field(default_factory=list)  # per sampled row: its logprobs k, -1: none
    k: int = -1  # top-k of the logprob table (the largest asked); -1: no table
    slots: int = 0

    def counts(self) -> list[int]:
        """The header's H_NB, H_NR, H_NP, H_NO, H_P, H_LPK, H_SLOTS."""
        return [len(self.bias), len(self.resets), len(self.prompt_pairs), len(self.output_pairs),
                len(self.prompt_positions), self.k + 1, self.slots]

    def sections(self) -> list[np.ndarray]:
        """The int32 plan sections after the sampling rows (engine/runtime/step_plan.py's layout)."""
        bias = np.zeros((len(self.bias), 3), dtype=np.int32)
        if self.bias:
            bias[:, :2] = [(r, t) for r, t, _ in self.bias]
            bias[:, 2] = np.asarray([v for _, _, v in self.bias], dtype=np.float32).view(np.int32)
        pairs = [np.asarray(p, dtype=np.int32).reshape(-1) for p in (self.prompt_pairs, self.output_pairs)]
        return [bias.reshape(-1), np.asarray(self.resets, dtype=np.int32), *pairs,
                np.asarray(self.prompt_targets, dtype=np.int32)]


def _wants_extras(p: SamplingParams) -> bool:
    return (p.has_penalties or p.logit_bias is not None or p.min_tokens > 0 or p.logprobs is not None
            or p.prompt_logprobs is not None)


class SamplingPlanner:
    def __init__(self, num_slots: int, vocab_size: int, default_logprobs_mode: str = "raw_logprobs"):
        self.num_slots, self.vocab = num_slots, vocab_size
        self.default_mode = default_logprobs_mode
        self.free = list(range(num_slots - 1, -1, -1))  # pop() takes the lowest
        self.slot_of: dict[int, tuple[int, int, object]] = {}  # seq id -> (slot, preemptions, seq)
        self.prompt_next: dict[int, int] = {}  # seq id -> the next prompt token whose logprob is owed

    def prepare(self, chunks) -> SamplingExtras | None:
        """The extras of a micro-batch's chunks (engine/runtime/scheduler.py Chunk); None if no row asks."""
        if not any(_wants_extras(c.seq.params) for c in chunks):
            return None
        ex = SamplingExtras(slots=self.num_slots)
        start = 0
        for c in chunks:
            s, p = c.seq, c.seq.params
            slot = self._slot(s, ex) if p.has_penalties else -1
            if p.prompt_logprobs is not None:
                self._prompt_rows(s, c, start, ex)
            start += c.length
            if not c.sample:
                continue
            row = len(ex.row_fields)
            k = p.logprobs if p.logprobs is not None else -1
            mode = p.logprobs_mode or self.default_mode
            ex.row_fields.append((slot, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, k,
                                  int(mode == PROCESSED)))
            ex.row_k.append(k)
            ex.k = max(ex.k, k)
            for tok, v in (p.logit_bias or {}).items():
                if tok < self.vocab:
                    ex.bias.append((row, tok, v))
            if len(s.output_ids) + c.pending < p.min_tokens:  # the step of the token it samples
                ex.bias += [(row, t, float("-inf")) for t in sorted(s.stop_ids) if t < self.vocab]
        if ex.prompt_positions:
            ex.k = max(ex.k, max(k for _, k in ex.prompt_owners))
        return ex

    def _slot(self, seq, ex: SamplingExtras) -> int:
        held = self.slot_of.get(seq.seq_id)
        if held is not None and held[1] == seq.num_preemptions:
            return held[0]
        slot = held[0] if held is not None else self._take()
        self.slot_of[seq.seq_id] = (slot, seq.num_preemptions, seq)
        ex.resets.append(slot)
        if seq.params.repetition_penalty != 1:
            ex.prompt_pairs += [(slot, t) for t in set(seq.token_ids[:seq.prompt_len])]
        ex.output_pairs += [(slot, t) for t in seq.output_ids]
        return slot

    def _take(self) -> int:
        if not self.free:  # a preempted sequence's slot: it is re-filled when it runs again
            sid = next((i for i, (_, _, s) in self.slot_of.items() if s.status.value != "running"), None)
            if sid is None:
                raise RuntimeError(f"all {self.num_slots} penalty slots are held by running sequences")
            self.free.append(self.slot_of.pop(sid)[0])
        return self.free.pop()

    def _prompt_rows(self, seq, c, start: int, ex: SamplingExtras) -> None:
        """Rows for the prompt tokens j in (c.start, c.end] (j < prompt_len, not yet asked): the
        logits at position j - 1 give token j's logprob."""
        first = max(c.start + 1, self.prompt_next.get(seq.seq_id, 1))
        last = min(c.end, seq.prompt_len - 1)
        for j in range(first, last + 1):
            ex.prompt_positions.append(start + j - 1 - c.start)
            ex.prompt_targets.append(seq.token_ids[j])
            ex.prompt_owners.append((seq.seq_id, seq.params.prompt_logprobs))
        if last >= first:
            self.prompt_next[seq.seq_id] = last + 1

    def release(self, seq_id: int) -> None:
        """The sequence finished or was aborted: its slot is free again."""
        held = self.slot_of.pop(seq_id, None)
        if held is not None:
            self.free.append(held[0])
        self.prompt_next.pop(seq_id, None)
