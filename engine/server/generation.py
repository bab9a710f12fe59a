"""One request through the engine on the event loop: LLM.submit with an on_event callback feeding an
asyncio.Queue, token ids turned into text deltas (incremental detokenization, stop strings), an
abort whenever the consumer stops early (client gone, stop string, cancellation)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

from .detokenize import IncrementalDetokenizer, StopStrings
from .metrics import ServerMetrics


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


class Submitted:
    """A request queued in the engine (LLM.submit, which validated it). Iterate `pieces()` once;
    leaving it early, or dropping this object unstarted, aborts the request and frees its blocks."""

    def __init__(self, llm, ids: list[int], params, stops: list[str], request_id: str, metrics: ServerMetrics,
                 arrival: float):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = len(ids)
        self._stops, self._tokenizer, self._metrics, self._arrival = stops, llm.tokenizer, metrics, arrival
        # the stream object must stay referenced while the request runs: collecting it aborts it
        self.stream = llm.submit(ids, params, request_id=request_id, on_event=self._on_event)

    def _on_event(self, ev) -> None:  # router thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def abort(self) -> None:
        self.stream.abort()

    async def pieces(self) -> AsyncIterator[Piece]:
        detok = IncrementalDetokenizer(self._tokenizer) if self._tokenizer is not None else None
        stops = StopStrings(self._stops or [])
        n, first_t, done = 0, None, False
        try:
            while True:
                ev = await self._queue.get()
                if isinstance(ev, BaseException):
                    done = True
                    raise EngineError(f"the engine failed: {str(ev).splitlines()[0] if str(ev) else type(ev).__name__}")
                n += 1
                now = time.monotonic()
                if first_t is None:
                    first_t = now
                    self._metrics.first_token(now - self._arrival)
                reason = ev.finish_reason
                delta = detok.add(ev.token_id) if detok is not None else ""
                if reason is not None and detok is not None:
                    delta += detok.flush()
                text, hit = stops.push(delta)
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
                if text:
                    yield Piece(text, n, None)
        finally:
            if not done:
                self.stream.abort()
                self._metrics.request_done("abort", time.monotonic() - self._arrival, n,
                                           (time.monotonic() - first_t) if first_t is not None else 0.0)

    async def collect(self) -> Result:
        r = Result(self.prompt_tokens)
        parts = []
        async for p in self.pieces():
            parts.append(p.text)
            r.num_tokens, r.finish_reason = p.num_tokens, p.finish_reason
        r.text = "".join(parts)
        return r
