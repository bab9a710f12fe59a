"""bench/bench_e2e.py's decode rows on a stand-in LLM whose calls take known times on a fake
clock: the figure is the per-step time, and one slow call among the repetitions does not move it."""
import sys
from pathlib import Path

import pytest
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_e2e  # noqa: E402


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _FakeLLM:
    """generate(): 40 ms of prefill and 3 ms (batch 1) or 12 ms (batch 16) a token on the clock,
    and 13 ms more on the calls listed in slow (by call number)."""
    max_model_len = 4096

    def __init__(self, clock, slow=()):
        self.clock, self.slow, self.calls = clock, set(slow), 0

    def generate(self, prompts, sp):
        self.calls += 1
        step = 0.003 if len(prompts) == 1 else 0.012
        self.clock.now += 0.040 + step * sp.max_tokens + (0.013 if self.calls in self.slow else 0.0)
        return [SimpleNamespace(token_ids=[0] * sp.max_tokens) for _ in prompts]

    def stats(self, reset=False):
        return {"stages": [{"busy_ms": 1.0}]}


def _rows(monkeypatch, slow, reps):
    clock = _Clock()
    monkeypatch.setattr(bench_e2e.time, "perf_counter", clock)
    rows = bench_e2e.decode_rows(_FakeLLM(clock, slow), lambda n: [1] * n, 0, n_req=2, reps=reps)
    return {r["batch"]: r["ms_per_step"] for r in rows if r["what"] == "decode"}


def test_decode_rows_take_the_fastest_calls(monkeypatch):
    # call 1 is batch 1's warm-up; calls 2-4 its 1-token calls, 5-7 its 65-token ones
    assert _rows(monkeypatch, slow=(2,), reps=3) == {1: 3.0, 16: 12.0}
    assert _rows(monkeypatch, slow=(6, 9), reps=3) == {1: 3.0, 16: 12.0}
    one = _rows(monkeypatch, slow=(2,), reps=1)  # a single call each: the slow 1-token call shows
    assert one[16] == 12.0 and abs(one[1] - (3.0 - 13.0 / 64)) < 1e-3


@pytest.mark.parametrize("reps", [0, -2])
def test_decode_rows_refuse_no_repetitions(monkeypatch, reps):
    with pytest.raises(ValueError, match="--decode-reps must be at least 1"):
        _rows(monkeypatch, slow=(), reps=reps)
