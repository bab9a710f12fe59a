"""Per-request grammar state: which tokens may come next (a row of the int32 bitmask) and the tokens
accepted so far, with rollback; optionally reasoning-aware (free until `</think>`, then the grammar)."""
from __future__ import annotations

from typing import Any

import torch

from engine.structured.compiler import import_xgrammar

ALL_ALLOWED = -1  # an int32 word with all 32 bits set


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """int32 [rows, ceil(vocab_size / 32)] on CPU, all tokens allowed (xgrammar's layout: bit t % 32
    of word t // 32 of a row says whether token t may be sampled)."""
    return torch.full((rows, bitmask_width(vocab_size)), ALL_ALLOWED, dtype=torch.int32)


class StructuredMatcher:
    """The grammar state of one request. `reasoning_end_id` (the `</think>` token) makes it
    reasoning-aware: every token is allowed and nothing reaches the grammar until that token has been
    accepted, as vLLM's reasoning-aware structured output does; then the grammar applies."""

    def __init__(self, compiled_grammar: Any, reasoning_end_id: int | None = None):
        xgr = import_xgrammar()
        self._m = xgr.GrammarMatcher(compiled_grammar)
        self.reasoning_end_id = reasoning_end_id
        self._reasoning_tokens = 0  # tokens accepted while reasoning, `</think>` included
        self._grammar_tokens = 0  # tokens accepted by the grammar
        self._in_reasoning = reasoning_end_id is not None

    @property
    def in_reasoning(self) -> bool:
        return self._in_reasoning

    @property
    def is_terminated(self) -> bool:
        """The grammar has accepted a stop token: nothing more may be accepted."""
        return not self._in_reasoning and self._m.is_terminated()

    @property
    def num_accepted(self) -> int:
        return self._reasoning_tokens + self._grammar_tokens

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False (state unchanged) when the grammar forbids it."""
        if self._in_reasoning:
            self._reasoning_tokens += 1
            if token == self.reasoning_end_id:
                self._in_reasoning = False
            return True
        if not self._m.accept_token(int(token)):
            return False
        self._grammar_tokens += 1
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (CPU int32 [R, ceil(V/32)])."""
        if self._in_reasoning:
            bitmask[row].fill_(ALL_ALLOWED)
        else:
            self._m.fill_next_token_bitmask(bitmask, row)

    def rollback(self, n: int) -> None:
        """Forget the last n accepted tokens (a speculative step that a stop cut short, a preemption
        that recomputes); rolling back over `</think>` re-enters reasoning."""
        if n < 0 or n > self.num_accepted:
            raise ValueError(f"rollback({n}): only {self.num_accepted} tokens were accepted")
        from_grammar = min(n, self._grammar_tokens)
        if from_grammar:
            self._m.rollback(from_grammar)
            self._grammar_tokens -= from_grammar
        if n > from_grammar:
            self._reasoning_tokens -= n - from_grammar
            self._in_reasoning = True

    def reset(self) -> None:
        """Back to the state before any token (reasoning-aware matchers start in reasoning again)."""
        self._m.reset()
        self._reasoning_tokens = self._grammar_tokens = 0
        self._in_reasoning = self.reasoning_end_id is not None


def fill_bitmasks(matchers: list[StructuredMatcher], bitmask: torch.Tensor, batch: Any = None) -> None:
    """bitmask[i] = the allowed next tokens of matchers[i] (all, while it reasons), the grammar rows
    filled together on xgrammar's threads (batch: an xgrammar BatchGrammarMatcher to reuse)."""
    rows = []
    for i, m in enumerate(matchers):
        if m.in_reasoning:
            bitmask[i].fill_(ALL_ALLOWED)
        else:
            rows.append(i)
    if len(rows) == 1:
        matchers[rows[0]].fill_bitmask(bitmask, rows[0])
    elif rows:
        batch = batch if batch is not None else import_xgrammar().BatchGrammarMatcher()
        batch.batch_fill_next_token_bitmask([matchers[i]._m for i in rows], bitmask, rows)
