"""The one clock of a stage's timings (its busy time, the timeline trace, the per-layer costs of the
automatic split): marks in the device's stream order, CUDA events on CUDA, else the host's
monotonic clock. Spans are read from completed marks only (`query()`), so a stats request never
waits for the device; a span still running is counted by a later read."""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterator

import torch

MAX_STEP_RECORDS = 2048  # per-step timings kept for stats(per_step=True); older ones are dropped


def now_us() -> float:
    """The host clock in microseconds: CLOCK_MONOTONIC, one clock for every process of the host."""
    return time.monotonic_ns() / 1e3


class Clock:
    """Marks of one device. cuda: marks are events recorded in the current stream (make_event: their
    factory, a fake one in CPU tests), else host microseconds."""

    def __init__(self, cuda: bool, make_event: Callable[[], Any] | None = None):
        self.cuda = cuda
        self._make_event = make_event or (lambda: torch.cuda.Event(enable_timing=True))

    @classmethod
    def for_device(cls, device: torch.device | str) -> "Clock":
        return cls(torch.device(device).type == "cuda")

    def mark(self):
        if self.cuda:
            e = self._make_event()
            e.record()
            return e
        return now_us()

    def done(self, mark) -> bool:
        """Whether the device has passed the mark (never waits)."""
        return not self.cuda or mark.query()

    def wait(self, mark) -> None:
        if self.cuda:
            mark.synchronize()

    def ms(self, start, end) -> float:
        """Milliseconds from start to end; both done."""
        return start.elapsed_time(end) if self.cuda else (end - start) / 1e3


class Spans:
    """(start, end, payload) in record order; drain() hands back those whose end the device has
    passed. One stream completes in order, so the first span still running ends a drain."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._q: deque = deque()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, start, end, payload: Any = None) -> None:
        self._q.append((start, end, payload))

    def drain(self, wait: bool = False) -> Iterator[tuple[float, Any, Any]]:
        """(ms, start, payload) of each completed span, oldest first; wait: every span (the device
        is waited for)."""
        if wait and self._q:
            self.clock.wait(self._q[-1][1])
        while self._q and self.clock.done(self._q[0][1]):
            s, e, payload = self._q.popleft()
            yield self.clock.ms(s, e), s, payload

    def clear(self) -> None:
        self._q.clear()


class StageTimer:
    """Busy time of a stage's forwards (or samples) in its stream: totals since the last reset and
    the last MAX_STEP_RECORDS steps. collect() never waits for the device: a step still running
    is left pending (its count is in 'pending_steps') and lands in the window open when a later
    collect sees it done. on_step(ms, tokens, pairs), where set, sees each completed step that
    stop() was given pairs for (stage 0's: the step-cost calibration of max_step_ms)."""

    def __init__(self, device: torch.device | str, clock: Clock | None = None):
        self.clock = clock or Clock.for_device(device)
        self.spans = Spans(self.clock)
        self.on_step: Callable[[float, int, float], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.busy_ms, self.steps, self.tokens = 0.0, 0, 0
        self.step_ms: list[float] = []
        self.step_tokens: list[int] = []

    def start(self):
        return self.clock.mark()

    def stop(self, started, num_tokens: int, pairs: float | None = None) -> None:
        self.spans.add(started, self.clock.mark(), (num_tokens, pairs))
        # on_step's reader (the step bound) wants steps as they complete: then each stop() reads
        # what is done (one event query when nothing is); else every 64 steps
        if not self.clock.cuda or self.on_step is not None or len(self.spans) > 64:
            self._resolve()

    def _resolve(self) -> None:
        for ms, _, (tokens, pairs) in self.spans.drain():
            if self.on_step is not None and pairs is not None:
                self.on_step(ms, tokens, pairs)
            self.busy_ms += ms
            self.steps += 1
            self.tokens += tokens
            self.step_ms.append(ms)
            self.step_tokens.append(tokens)
        if len(self.step_ms) > 2 * MAX_STEP_RECORDS:
            del self.step_ms[:-MAX_STEP_RECORDS], self.step_tokens[:-MAX_STEP_RECORDS]

    def collect(self, reset: bool, per_step: bool = False) -> dict:
        self._resolve()
        out = {"busy_ms": self.busy_ms, "steps": self.steps, "tokens": self.tokens,
               "pending_steps": len(self.spans)}
        if per_step:
            out["step_ms"] = self.step_ms[-MAX_STEP_RECORDS:]
            out["step_tokens"] = self.step_tokens[-MAX_STEP_RECORDS:]
        if reset:
            self.reset()
        return out


class LayerClock:
    """Per-layer time of a Stage's eager forwards while installed (forward pre/post hooks), and the
    whole forwards' under key -1 (CUDA-graph replays run no hooks and are not seen), on the stage's
    clock (Clock)."""

    def __init__(self, stage):
        self.clock = Clock.for_device(stage.device)
        self.spans = Spans(self.clock)  # payload: the layer index
        self.ms: dict[int, float] = {}
        self._open: dict[int, object] = {}
        self._hooks = []
        for i, mod in [(-1, stage)] + [(int(n), layer) for n, layer in stage.layers.items()]:
            # outermost: the clock also sees what other hooks on the module do (a test's slow layer)
            self._hooks.append(mod.register_forward_pre_hook(lambda m, a, i=i: self._begin(i), prepend=True))
            self._hooks.append(mod.register_forward_hook(lambda m, a, o, i=i: self._end(i)))

    def _begin(self, i: int) -> None:
        self._open[i] = self.clock.mark()

    def _end(self, i: int) -> None:
        self.spans.add(self._open.pop(i), self.clock.mark(), i)

    def collect(self) -> dict[int, float]:
        """Milliseconds per layer so far (waits for the device: a measurement is whole)."""
        for ms, _, i in self.spans.drain(wait=True):
            self.ms[i] = self.ms.get(i, 0.0) + ms
        return dict(self.ms)

    def remove(self) -> dict[int, float]:
        out = self.collect()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return out
