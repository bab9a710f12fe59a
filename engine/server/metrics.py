"""/metrics in the Prometheus text format (0.0.4): the server's latency histograms and counters, and
the engine's scheduler and per-stage figures from LLM.stats()."""
from __future__ import annotations

import bisect
import threading
import time

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
PREFIX = "moepipe_"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip((*self.buckets, "+Inf"), self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Filled by the request handlers (event loop thread); read by /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished: dict[str, int] = {}
        self.rejected = 0
        self._last_busy: tuple[float, dict[int, float]] = (time.monotonic(), {})

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def request_done(self, reason: str, e2e_s: float, tokens: int, first_to_last_s: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(e2e_s)
            if tokens > 1:
                self.tpot.observe(first_to_last_s / (tokens - 1))

    def busy_fractions(self, stages: list[dict], now: float | None = None) -> dict[int, float]:
        """Each stage's busy time over the wall time since the previous scrape (since the server
        started, for the first)."""
        now = time.monotonic() if now is None else now
        busy = {int(s.get("rank", i)): float(s.get("busy_ms", 0.0)) / 1e3 for i, s in enumerate(stages)}
        with self._lock:
            last, self._last_busy = self._last_busy, (now, busy)
        if now <= last[0]:
            return {}
        dt = now - last[0]
        return {r: min(1.0, max(0.0, (b - last[1].get(r, 0.0)) / dt)) for r, b in busy.items()}

    def render(self, stats: dict | None, model: str) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP {PREFIX}{name} {help}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            for labels, v in samples:
                lines.append(f"{PREFIX}{name}{labels} {v}")

        with self._lock:
            for name, h, help in (("time_to_first_token_seconds", self.ttft, "Time to first token"),
                                  ("time_per_output_token_seconds", self.tpot, "Time per output token after the first"),
                                  ("e2e_request_latency_seconds", self.e2e, "Request latency")):
                lines += [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} histogram"]
                lines += h.lines(PREFIX + name)
            metric("request_success_total", "counter", "Finished requests by finish reason",
                   [(f'{{finished_reason="{k}"}}', v) for k, v in sorted(self.finished.items())])
            metric("request_rejected_total", "counter", "Requests refused with a 4xx", [("", self.rejected)])
        if stats is not None:
            sch = stats.get("scheduler", {})
            num, free = sch.get("num_blocks"), sch.get("free_blocks")
            for key, name, kind, help in (
                    ("running", "num_requests_running", "gauge", "Sequences in the running batch"),
                    ("waiting", "num_requests_waiting", "gauge", "Sequences waiting to be scheduled"),
                    ("preemptions", "num_preemptions_total", "counter", "Sequences preempted for KV blocks"),
                    ("prompt_tokens", "prompt_tokens_total", "counter", "Prompt tokens prefilled"),
                    ("generation_tokens", "generation_tokens_total", "counter", "Tokens generated")):
                if key in sch:
                    metric(name, kind, help, [("", sch[key])])
            if num is not None and free is not None:
                metric("kv_blocks_total", "gauge", "KV cache blocks in the pool", [("", num)])
                metric("kv_blocks_free", "gauge", "KV cache blocks free", [("", free)])
                metric("kv_blocks_used", "gauge", "KV cache blocks in use", [("", num - free)])
                metric("kv_cache_usage_perc", "gauge", "Fraction of KV blocks in use", [("", (num - free) / max(num, 1))])
            stages = stats.get("stages", [])
            frac = self.busy_fractions(stages)
            per = [(f'{{stage="{int(s.get("rank", i))}"}}', s) for i, s in enumerate(stages)]
            metric("stage_busy_seconds_total", "counter", "Seconds each stage spent computing",
                   [(lab, float(s.get("busy_ms", 0.0)) / 1e3) for lab, s in per])
            metric("stage_busy_fraction", "gauge", "Busy share of each stage since the previous scrape",
                   [(lab, frac[int(s.get("rank", i))]) for i, (lab, s) in enumerate(per)
                    if int(s.get("rank", i)) in frac])
            for key, name, help in (("steps", "stage_steps_total", "Micro-batch steps each stage ran"),
                                    ("tokens", "stage_tokens_total", "Tokens each stage processed")):
                if all(key in s for _, s in per) and per:
                    metric(name, "counter", help, [(lab, s[key]) for lab, s in per])
        label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        metric("model_info", "gauge", "The served model", [(f'{{model="{label}"}}', 1)])
        return "\n".join(lines) + "\n"
