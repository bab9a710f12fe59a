"""/metrics through prometheus-client, under vLLM's names with the `moepipe:` prefix (vLLM's
`vllm:`), each labelled model_name: the server's latency histograms and request counters, and the
engine's scheduler and per-stage figures read from LLM.stats() at scrape time. The names are
listed in the README's Serve section."""
from __future__ import annotations

import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
PREFIX = "moepipe:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# LLM.stats()["scheduler"] key -> (metric name without prefix, counter?, help)
disable_created_metrics()  # no `_created` series beside each counter and histogram
SCHEDULER_METRICS = (("running", "num_requests_running", False, "Sequences in the running batch"),
                     ("waiting", "num_requests_waiting", False, "Sequences waiting to be scheduled"),
                     ("preemptions", "num_preemptions", True, "Sequences preempted for KV blocks"),
                     ("prompt_tokens", "prompt_tokens", True, "Prompt tokens prefilled"),
                     ("generation_tokens", "generation_tokens", True, "Tokens generated"),
                     ("prefix_cache_queries", "prefix_cache_queries", True,
                      "Prompt tokens looked up in the prefix cache"),
                     ("prefix_cache_hits", "prefix_cache_hits", True, "Prompt tokens found in the prefix cache"),
                     ("step_bound_over", "step_bound_over", True,
                      "--max-step-ms: steps the bound left too little prefill (they took the token budget's chunk)"),
                     ("step_cost_scale", "step_cost_scale", False,
                      "--max-step-ms: measured over fitted step time (present with the bound on)"))


class ServerMetrics:
    """Filled by the request handlers; rendered by /metrics (`render`, off the event loop: it asks
    the engine for its stats)."""

    def __init__(self, model: str = "", stats: Callable[[], dict | None] = lambda: None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model, self._stats = model, stats
        labels, m = ["model_name"], {"registry": self.registry}
        self._ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token", labels,
                               buckets=TTFT_BUCKETS, **m).labels(model)
        self._tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token after the first",
                               labels, buckets=TPOT_BUCKETS, **m).labels(model)
        self._e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency", labels,
                              buckets=E2E_BUCKETS, **m).labels(model)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], **m)
        self._rejected = Counter(PREFIX + "request_rejected", "Requests refused with a 4xx", labels, **m).labels(model)
        self._lock = threading.Lock()
        self._last_busy: tuple[float, dict[int, float]] = (time.monotonic(), {})
        self.registry.register(_EngineCollector(self))

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def rejected(self) -> None:
        self._rejected.inc()

    def request_done(self, reason: str, e2e_s: float, tokens: int, first_to_last_s: float) -> None:
        self._success.labels(self.model, reason).inc()
        self._e2e.observe(e2e_s)
        if tokens > 1:
            self._tpot.observe(first_to_last_s / (tokens - 1))

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

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's figures, read from LLM.stats() once per scrape (nothing when it is down)."""

    def __init__(self, owner: ServerMetrics):
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        o, model = self.owner, self.owner.model

        def family(name: str, counter: bool, help: str, labels: tuple[str, ...] = ()):
            cls = CounterMetricFamily if counter else GaugeMetricFamily
            return cls(PREFIX + name, help, labels=["model_name", *labels])

        info = family("model_info", False, "The served model")
        info.add_metric([model], 1)
        yield info
        try:
            stats = o._stats()
        except RuntimeError:  # the engine is down or closed
            stats = None
        if not stats:
            return
        sch = stats.get("scheduler", {})
        for key, name, counter, help in SCHEDULER_METRICS:
            if key in sch:
                f = family(name, counter, help)
                f.add_metric([model], sch[key])
                yield f
        num, free = sch.get("num_blocks"), sch.get("free_blocks")
        if num is not None and free is not None:
            for name, help, v in (("kv_blocks_total", "KV cache blocks in the pool", num),
                                  ("kv_blocks_free", "KV cache blocks free", free),
                                  ("kv_blocks_used", "KV cache blocks in use", num - free),
                                  ("kv_cache_usage_perc", "Fraction of KV blocks in use", (num - free) / max(num, 1))):
                f = family(name, False, help)
                f.add_metric([model], v)
                yield f
        stages = stats.get("stages", [])
        ranks = [int(s.get("rank", i)) for i, s in enumerate(stages)]
        frac = o.busy_fractions(stages)
        per_stage = [("stage_busy_seconds", True, "Seconds each stage spent computing",
                      [float(s.get("busy_ms", 0.0)) / 1e3 for s in stages]),
                     ("stage_busy_fraction", False, "Busy share of each stage since the previous scrape",
                      [frac.get(r) for r in ranks])]
        for key, name, help in (("steps", "stage_steps", "Micro-batch steps each stage ran"),
                                ("tokens", "stage_tokens", "Tokens each stage processed")):
            if stages and all(key in s for s in stages):
                per_stage.append((name, True, help, [s[key] for s in stages]))
        for name, counter, help, values in per_stage:
            f = family(name, counter, help, ("stage",))
            for r, v in zip(ranks, values):
                if v is not None:
                    f.add_metric([model, str(r)], v)
            yield f
