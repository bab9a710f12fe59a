"""engine/runtime/clock.py: the stage timer reads device timings from completed events only (a stats
request never waits for the GPU), on CPU with a fake event whose synchronize() fails the test."""
from __future__ import annotations

import pytest

from engine.runtime.clock import MAX_STEP_RECORDS, Clock, Spans, StageTimer


class FakeDevice:
    """A stream whose events complete when the test says so; each event's time is set at record."""

    def __init__(self):
        self.t_ms = 0.0
        self.recorded: list["FakeEvent"] = []
        self.completed = 0  # events [0, completed) are done

    def event(self) -> "FakeEvent":
        return FakeEvent(self)

    def run(self, ms: float) -> None:
        self.t_ms += ms

    def finish(self, n: int | None = None) -> None:
        self.completed = len(self.recorded) if n is None else n


class FakeEvent:
    def __init__(self, dev: FakeDevice):
        self.dev, self.index, self.t_ms = dev, None, None

    def record(self) -> None:
        self.index, self.t_ms = len(self.dev.recorded), self.dev.t_ms
        self.dev.recorded.append(self)

    def query(self) -> bool:
        return self.index < self.dev.completed

    def synchronize(self) -> None:
        raise AssertionError("waited for the device")

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.query() and end.query(), "elapsed_time of an event not yet complete"
        return end.t_ms - self.t_ms


def _timer() -> tuple[StageTimer, FakeDevice]:
    dev = FakeDevice()
    return StageTimer("cuda", Clock(True, dev.event)), dev


def _step(timer: StageTimer, dev: FakeDevice, ms: float, tokens: int) -> None:
    t = timer.start()
    dev.run(ms)
    timer.stop(t, tokens)


def test_collect_counts_completed_steps_and_never_waits():
    timer, dev = _timer()
    for ms, n in ((2.0, 8), (3.0, 1), (5.0, 1)):
        _step(timer, dev, ms, n)
    assert timer.collect(reset=False) == {"busy_ms": 0.0, "steps": 0, "tokens": 0, "pending_steps": 3}
    dev.finish(4)  # the first two steps' start and end events
    got = timer.collect(reset=False, per_step=True)
    assert (got["busy_ms"], got["steps"], got["tokens"], got["pending_steps"]) == (5.0, 2, 9, 1)
    assert got["step_ms"] == [2.0, 3.0] and got["step_tokens"] == [8, 1]
    dev.finish()
    got = timer.collect(reset=False)
    assert (got["busy_ms"], got["steps"], got["tokens"], got["pending_steps"]) == (10.0, 3, 10, 0)


def test_a_step_still_running_is_counted_in_the_window_open_when_it_completes():
    timer, dev = _timer()
    _step(timer, dev, 4.0, 2)
    dev.finish()
    _step(timer, dev, 6.0, 3)
    closed = timer.collect(reset=True)
    assert (closed["busy_ms"], closed["steps"], closed["pending_steps"]) == (4.0, 1, 1)
    assert timer.collect(reset=False)["steps"] == 0
    dev.finish()
    got = timer.collect(reset=False)
    assert (got["busy_ms"], got["steps"], got["tokens"], got["pending_steps"]) == (6.0, 1, 3, 0)


def test_stop_drains_completed_steps_so_pending_stays_bounded():
    timer, dev = _timer()
    for _ in range(70):
        _step(timer, dev, 1.0, 1)
        dev.finish()
    assert len(timer.spans) <= 65  # drained from stop() without any collect
    assert timer.collect(reset=False)["steps"] == 70


def test_on_step_sees_each_step_once_done_and_never_waits():
    """With on_step set (max_step_ms's calibration), each stop() hands over the steps the device has
    finished, with their sizes, without waiting for the rest: the bound calibrates from the first
    steps instead of after 64; steps stopped without pairs (the sampler's) are counted, not handed."""
    timer, dev = _timer()
    seen = []
    timer.on_step = lambda ms, tokens, pairs: seen.append((ms, tokens, pairs))
    t = timer.start()
    dev.run(3.0)
    timer.stop(t, 16, 1600.0)
    assert seen == []  # still running
    dev.finish()
    t = timer.start()
    dev.run(5.0)
    timer.stop(t, 4, None)
    assert seen == [(3.0, 16, 1600.0)]
    dev.finish()
    t = timer.start()
    timer.stop(t, 1, 10.0)
    assert seen == [(3.0, 16, 1600.0)] and timer.collect(reset=False)["steps"] == 2


def test_spans_follow_stream_order():
    """A later span is not read before an earlier one that is still running (one stream)."""
    dev = FakeDevice()
    clock = Clock(True, dev.event)
    spans = Spans(clock)
    a0, a1 = clock.mark(), clock.mark()
    b0, b1 = clock.mark(), clock.mark()
    spans.add(a0, a1, "a")
    spans.add(b0, b1, "b")
    dev.completed = 1  # a0 done, a1 not
    assert list(spans.drain()) == [] and len(spans) == 2
    with pytest.raises(AssertionError, match="waited"):
        list(spans.drain(wait=True))  # an explicit whole read waits (traces, per-layer costs)


def test_host_clock_on_cpu_counts_each_step_at_once():
    timer = StageTimer("cpu")
    for n in range(3 * MAX_STEP_RECORDS):
        timer.stop(timer.start(), n)
    got = timer.collect(reset=True, per_step=True)
    assert got["steps"] == 3 * MAX_STEP_RECORDS and got["pending_steps"] == 0 and got["busy_ms"] >= 0
    assert len(got["step_ms"]) == MAX_STEP_RECORDS and got["step_tokens"][-1] == 3 * MAX_STEP_RECORDS - 1
    assert timer.collect(reset=False)["steps"] == 0
