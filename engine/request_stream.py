"""RequestStream: one request's tokens as TokenEvents, fed by the engine client's router thread."""
from __future__ import annotations

import queue
import weakref
from dataclasses import dataclass
from typing import Callable

from .client import POLL_S


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    finish_reason: str | None  # "stop" | "length" on a request's last token, else None
    logprobs: tuple | None = None  # SamplingParams.logprobs: (logprob, rank, top ids, top logprobs)
    prompt_logprobs: list | None = None  # on the first token: one such tuple per prompt token after the first
    stop_reason: str | None = None  # the stop string that ended it
    text: str | None = None  # with stop_reason: the output text, cut before the stop string


class StopChecker:
    """SamplingParams.stop on the host: the output decoded incrementally (engine/server/detokenize.py),
    searched for the stop strings once min_tokens are out (only the text new since the last token,
    plus the longest stop's length). On a hit `text` is cut before the string (or after it, with
    include_stop_str_in_output)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], include: bool, min_tokens: int):
        from .server.detokenize import IncrementalDetokenizer
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops, self.include, self.min_tokens = stops, include, min_tokens
        self.longest = max(len(s) for s in stops)
        self.text = ""
        self.n = 0

    @classmethod
    def of(cls, params, tokenizer) -> "StopChecker | None":
        """The checker of a request's SamplingParams.stop (None without stop strings)."""
        if not params.stop:
            return None
        return cls(tokenizer, params.stop, params.include_stop_str_in_output, params.min_tokens)

    def add(self, token_id: int, last: bool) -> str | None:
        """Take a token (last: the sequence's final one); returns the stop string it completed, if any."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += self.detok.add(token_id) + (self.detok.flush() if last else "")
        self.n += 1
        if self.n < self.min_tokens:
            return None
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.text = self.text[:i + (len(s) if self.include else 0)]
        return s


_ABORTED = object()  # ends the iteration of a stream aborted through LLM.abort


class RequestStream:
    """The tokens of one request as TokenEvents (blocking iterator). abort() or close() ends it
    early; so does garbage collection of an unfinished stream, and LLM.abort of its id.
    on_abort() ends the request in the engine (called once, by the first abort of an unfinished stream)."""

    def __init__(self, request_id: str, seq_id: int, on_abort: Callable[[], None]):
        self.request_id, self.seq_id = request_id, seq_id
        self._on_abort = on_abort
        self._queue: queue.Queue = queue.Queue()
        self.finished = False

    def feed(self, item) -> None:
        """Queue a TokenEvent, an exception (raised by the iterator) or _ABORTED (ends it)."""
        self._queue.put(item)

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> TokenEvent:
        if self.finished:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                continue
        if item is _ABORTED:
            self.finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finish_reason is not None:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._on_abort()

    close = abort

    def __del__(self):
        try:
            self.abort()
        except Exception:
            pass


@dataclass
class _Entry:
    request_id: str
    deliver: Callable  # TokenEvent or an exception -> None (runs on the router thread)
    own_queue: bool  # deliver feeds the stream's own queue (not a caller's on_event)
    stream: "weakref.ref[RequestStream]"
    stop: StopChecker | None = None

    def event(self, tok: int, reason: str | None, extra: dict | None) -> TokenEvent:
        """The TokenEvent of a token from the engine; one that completes a stop string ends the
        request with reason "stop" (the caller aborts its sequence in the engine)."""
        stop_reason = text = None
        if self.stop is not None:
            stop_reason = self.stop.add(tok, reason is not None)
            reason = "stop" if stop_reason is not None else reason
            text = self.stop.text if reason is not None else None
        extra = extra or {}
        return TokenEvent(tok, reason, extra.get("logprobs"), extra.get("prompt_logprobs"), stop_reason, text)
