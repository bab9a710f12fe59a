"""One request through the engine on the event loop: LLM.submit with an on_event callback feeding an
asyncio.Queue, token ids turned into text deltas (incremental detokenization, stop strings), an
abort whenever the consumer stops early (client gone, stop string, cancellation)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from .detokenize import IncrementalDetokenizer, StopStrings
from .metrics import ServerMetrics

log = logging.getLogger("moepipe.server")


@dataclass
class Piece:
    text: str  # new text since the previous piece
    num_tokens: int  # tokens generated so far
    finish_reason: str | None  # "stop" | "length" on the last piece


@dataclass
class Result:
    prompt_tokens: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None


class EngineError(RuntimeError):
    """The engine failed (a stage died, or it was closed) while serving a request."""


class EventPump:
    """Moves the router thread's events onto the event loop with one wake-up per burst (a pipeline
    step delivers one token to every running request at once), not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list = []

    def deliver(self, queue: asyncio.Queue, ev) -> None:  # router thread
        with self._lock:
            self._pending.append((queue, ev))
            if len(self._pending) > 1:
                return  # a drain is already scheduled
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for q, ev in items:
            q.put_nowait(ev)


class Submitted:
    """A request queued in the engine (LLM.submit, which validated it). Iterate `pieces()` once;
    leaving it early aborts the request and frees its blocks."""

    def __init__(self, llm, ids: list[int], params, stops: list[str], request_id: str, metrics: ServerMetrics,
                 arrival: float, pump: EventPump, reasoning: bool = False):
        self._queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = len(ids)
        self._stops, self._tokenizer, self._metrics, self._arrival = stops, llm.tokenizer, metrics, arrival
        queue = self._queue
        # the stream object must stay referenced while the request runs: collecting it aborts it
        # reasoning: the prompt leaves the model thinking; a grammar applies after its `</think>`
        self.stream = llm.submit(ids, params, request_id=request_id, on_event=lambda ev: pump.deliver(queue, ev),
                                 reasoning=reasoning)

    def abort(self) -> None:
        self.stream.abort()

    async def _events(self) -> list:
        """The next event and any others already here (a consumer that fell behind catches up in one piece)."""
        evs = [await self._queue.get()]
        while not self._queue.empty():
            evs.append(self._queue.get_nowait())
        return evs

    async def pieces(self) -> AsyncIterator[Piece]:
        """One Piece per batch of arrived tokens (its text may be empty: held back as a partial
        character or a possible stop string); the last one carries the finish reason."""
        detok = IncrementalDetokenizer(self._tokenizer) if self._tokenizer is not None else None
        stops = StopStrings(self._stops or [])
        n, first_t, done = 0, None, False
        try:
            while True:
                text, reason, hit = "", None, False
                for ev in await self._events():
                    if isinstance(ev, BaseException):
                        done = True
                        if isinstance(ev, ValueError):  # refused by the scheduler: its message is for the client
                            raise EngineError(f"the request was refused: {ev}")
                        log.error("request %s: the engine failed: %s", self.stream.request_id, ev)
                        raise EngineError("the engine failed")  # PIDs and tracebacks stay in the log
                    n += 1
                    reason = ev.finish_reason
                    delta = detok.add(ev.token_id) if detok is not None else ""
                    if reason is not None and detok is not None:
                        delta += detok.flush()
                    out, hit = stops.push(delta)
                    text += out
                    if hit or reason is not None:
                        break
                now = time.monotonic()
                if first_t is None:
                    first_t = now
                    self._metrics.first_token(now - self._arrival)
                if hit:
                    if reason is None:
                        self.stream.abort()
                    reason = "stop"
                if reason is not None:
                    done = True
                    text += stops.flush() if not hit else ""
                    self._metrics.request_done(reason, now - self._arrival, n, now - first_t)
                    yield Piece(text, n, reason)
                    return
                yield Piece(text, n, None)
        finally:
            if not done:
                self.stream.abort()
                now = time.monotonic()
                self._metrics.request_done("abort", now - self._arrival, n, now - first_t if first_t else 0.0)

    async def collect(self) -> Result:
        r = Result(self.prompt_tokens)
        parts = []
        async for p in self.pieces():
            parts.append(p.text)
            r.num_tokens, r.finish_reason = p.num_tokens, p.finish_reason
        r.text = "".join(parts)
        return r
