"""One request (one sample of one prompt) through the engine on the event loop: LLM.submit with an
on_event callback feeding an asyncio.Queue, token ids turned into text deltas (incremental
detokenization, held back while they may start a stop string: the engine cuts the text at one), the
logprobs carried along, an abort whenever the consumer stops early (client gone, cancellation)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from .detokenize import IncrementalDetokenizer, StopHoldback
from .metrics import ServerMetrics

log = logging.getLogger("moepipe.server")


@dataclass
class Piece:
    text: str  # new text since the previous piece
    num_tokens: int  # tokens generated so far
    finish_reason: str | None  # "stop" | "length" on the last piece
    token_ids: list[int] = field(default_factory=list)  # the tokens new since the previous piece
    logprobs: list | None = None  # SamplingParams.logprobs: a wire entry per token of token_ids
    prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs: on the first piece only
    stop_reason: str | int | None = None  # the stop string that ended it


@dataclass
class Result:
    prompt_tokens: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    stop_reason: str | int | None = None


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

    def __init__(self, llm, ids: list[int], params, request_id: str, metrics: ServerMetrics, arrival: float,
                 pump: EventPump, cache_salt: str | None = None, reasoning: bool = False):
        self._queue: asyncio.Queue = asyncio.Queue()
        self.prompt_ids, self.prompt_tokens = ids, len(ids)
        self._stops, self._tokenizer, self._metrics, self._arrival = params.stop, llm.tokenizer, metrics, arrival
        queue = self._queue
        # the stream object must stay referenced while the request runs: collecting it aborts it
        # reasoning: the prompt leaves the model thinking; a grammar applies after its `</think>`
        self.stream = llm.submit(ids, params, request_id=request_id, on_event=lambda ev: pump.deliver(queue, ev),
                                 cache_salt=cache_salt, reasoning=reasoning)

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
        hold = StopHoldback(self._stops)
        n, first_t, done = 0, None, False
        try:
            while True:
                piece = Piece("", n, None)
                for ev in await self._events():
                    if isinstance(ev, BaseException):
                        done = True
                        if isinstance(ev, ValueError):  # refused by the scheduler: its message is for the client
                            raise EngineError(f"the request was refused: {ev}")
                        log.error("request %s: the engine failed: %s", self.stream.request_id, ev)
                        raise EngineError("the engine failed")  # PIDs and tracebacks stay in the log
                    n += 1
                    piece.num_tokens, piece.finish_reason = n, ev.finish_reason
                    piece.token_ids.append(ev.token_id)
                    if ev.logprobs is not None:
                        piece.logprobs = (piece.logprobs or []) + [ev.logprobs]
                    if ev.prompt_logprobs is not None:
                        piece.prompt_logprobs = ev.prompt_logprobs
                    delta = detok.add(ev.token_id) if detok is not None else ""
                    if ev.finish_reason is not None:
                        delta += detok.flush() if detok is not None else ""
                        piece.text += hold.push(delta) if ev.text is None else ""
                        piece.text += hold.finish(ev.text)
                        piece.stop_reason = ev.stop_reason
                        break
                    piece.text += hold.push(delta)
                now = time.monotonic()
                if first_t is None:
                    first_t = now
                    self._metrics.first_token(now - self._arrival)
                if piece.finish_reason is not None:
                    done = True
                    self._metrics.request_done(piece.finish_reason, now - self._arrival, n, now - first_t)
                    yield piece
                    return
                yield piece
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
            r.num_tokens, r.finish_reason, r.stop_reason = p.num_tokens, p.finish_reason, p.stop_reason
            r.token_ids += p.token_ids
            if p.logprobs is not None:
                r.logprobs = (r.logprobs or []) + p.logprobs
            if p.prompt_logprobs is not None:
                r.prompt_logprobs = p.prompt_logprobs
        r.text = "".join(parts)
        return r
