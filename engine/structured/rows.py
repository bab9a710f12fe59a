"""Stage 0's side of structured output: a matcher per structured sequence, rebuilt from the LLM's
payload (each grammar deserialized once, a bounded cache), the bitmask rows of a micro-batch's
structured sampled rows, and the matchers' release when their sequences end."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from engine.structured.matcher import StructuredMatcher, allocate_bitmask, fill_bitmasks
from engine.structured.requests import GrammarPayload


class GrammarRows:
    def __init__(self, tokenizer_json: str | Path, vocab_size: int, stop_ids: tuple[int, ...], cache_size: int = 64):
        self._info_args = (tokenizer_json, vocab_size, tuple(stop_ids))
        self._info: Any = None  # xgrammar's TokenizerInfo, built at the first structured request
        self._grammars: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = cache_size
        self.vocab_size = vocab_size
        self.matchers: dict[int, StructuredMatcher] = {}  # seq id -> matcher, while the sequence lives
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher: fills many rows on its threads

    def attach(self, seq, payload: GrammarPayload) -> None:
        """Give seq (engine/runtime/sequence.py) a fresh matcher; ValueError if the grammar cannot be rebuilt."""
        seq.matcher = self.matchers[seq.seq_id] = StructuredMatcher(self._grammar(payload), payload.reasoning_end_id)

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)

    def release_finished(self, seqs) -> None:
        for s in seqs:
            if s.finish_reason is not None:
                self.matchers.pop(s.seq_id, None)

    def bitmask(self, chunks) -> tuple[np.ndarray, np.ndarray] | None:
        """(int32 [R_s] sampled-row indices, int32 [R_s, ceil(V/32)] their allowed tokens) of the
        micro-batch's structured rows that sample, or None when none does. Every token a row's
        sequence has is accepted already: a structured sequence is never continued before its
        token is known (Sequence.can_continue)."""
        rows, matchers = [], []
        r = 0
        for c in chunks:
            if c.sample:
                if c.seq.matcher is not None:
                    rows.append(r)
                    matchers.append(c.seq.matcher)
                r += 1
        if not rows:
            return None
        bitmask = allocate_bitmask(len(rows), self.vocab_size)
        if self._batch is None and len(rows) > 1:
            from engine.structured.compiler import import_xgrammar
            self._batch = import_xgrammar().BatchGrammarMatcher()
        fill_bitmasks(matchers, bitmask, self._batch)
        return np.asarray(rows, dtype=np.int32), bitmask.numpy()

    def _grammar(self, payload: GrammarPayload) -> Any:
        hit = self._grammars.get(payload.key)
        if hit is not None:
            self._grammars.move_to_end(payload.key)
            return hit
        from engine.structured.compiler import import_xgrammar, tokenizer_info
        xgr = import_xgrammar()
        if self._info is None:
            self._info = tokenizer_info(*self._info_args)
        try:
            compiled = xgr.CompiledGrammar.deserialize_json(payload.grammar_json, self._info)
        except Exception as e:  # noqa: BLE001 - xgrammar raises its own types; the request is refused
            raise ValueError(f"structured_outputs: stage 0 cannot rebuild the grammar: {e}") from None
        self._grammars[payload.key] = compiled
        while len(self._grammars) > self._cache_size:
            self._grammars.popitem(last=False)
        return compiled
