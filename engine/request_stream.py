"""RequestStream: one request's tokens as TokenEvents, fed by the LLM's router thread."""
from __future__ import annotations

import queue
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .llm import LLM

POLL_S = 0.25


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    finish_reason: str | None  # "stop" | "length" on a request's last token, else None


_ABORTED = object()  # ends the iteration of a stream aborted through LLM.abort


class RequestStream:
    """The tokens of one request as TokenEvents (blocking iterator). abort() or close() ends it
    early; so does garbage collection of an unfinished stream, and LLM.abort of its id."""

    def __init__(self, llm: "LLM", request_id: str, seq_id: int):
        self.request_id, self._seq_id = request_id, seq_id
        self._llm = weakref.ref(llm)
        self._queue: queue.Queue = queue.Queue()
        self.finished = False

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
            llm = self._llm()
            if llm is not None:
                llm._abort_seqs([self._seq_id])

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
