"""Timeline trace of the pipeline in Chrome's trace-event format (opens in ui.perfetto.dev and
chrome://tracing): one process track per stage, one thread lane per kind of work.

Slices ("X" complete events, ts and dur in microseconds on the host's monotonic clock):
  lane "gpu":  "forward prefill" | "forward decode" (decode: every row adds one token; args: mb,
               tokens, rows),
               "sample" (last stage; args: mb, rows)
  lane "host": "wait" (blocked for the previous stage's output, or stage 0 for the last stage's
               tokens; args: mb when known), "send" (args: mb, to), "schedule" (stage 0; args: mb,
               tokens, rows)
GPU slices are marked on the stage's clock (engine/runtime/clock.py: CUDA events, resolved only when the
trace is collected, never in the hot path); a base mark taken with the host clock at start places
them on the host timeline. On CPU every slice is host clock. A Tracer that is off costs one
attribute test per call site."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .clock import Clock, Spans, now_us as _now_us
LANES = {"gpu": 0, "host": 1}
NAMES = ("forward prefill", "forward decode", "sample", "wait", "send", "schedule")


def forward_name(max_query_len: int) -> str:
    return "forward decode" if max_query_len == 1 else "forward prefill"


class Tracer:
    """Slices of one stage; `on` is False until start()."""

    def __init__(self, rank: int, device: torch.device | str = "cpu", label: str | None = None):
        """label: the stage's track name, e.g. 'stage 0 (layers 0-23)'."""
        self.rank, self.device = rank, torch.device(device)
        self.label = label or f"stage {rank}"
        self.clock = Clock.for_device(self.device)
        self.on = False
        self._host: list[dict] = []
        self._gpu = Spans(self.clock)  # payload (name, args)
        self._base = None  # (device mark, host us) taken together

    def start(self) -> None:
        self._host = []
        self._gpu.clear()
        if self.clock.cuda:
            torch.cuda.synchronize(self.device)
        base = self.clock.mark()
        self.clock.wait(base)
        self._base = (base, _now_us() if self.clock.cuda else base)
        self.on = True

    # host-clock slices
    def host_start(self) -> float | None:
        return _now_us() if self.on else None

    def host_end(self, t0: float | None, name: str, args: dict | None = None) -> None:
        if t0 is None or not self.on:
            return
        self._host.append(self._event(name, "host", t0, _now_us() - t0, args))

    # device-timed slices (host clock on CPU)
    def gpu_start(self):
        return self.clock.mark() if self.on else None

    def gpu_end(self, t0, name: str, args: dict | None = None) -> None:
        if t0 is None or not self.on:
            return
        self._gpu.add(t0, self.clock.mark(), (name, args))

    def stop(self) -> list[dict]:
        """End recording; the stage's trace events (metadata first). The device is waited for here:
        a trace is whole."""
        self.on = False
        events = list(self._host)
        base, base_us = self._base or (None, 0.0)  # never started: no device slices either
        for ms, s, (name, args) in self._gpu.drain(wait=True):
            events.append(self._event(name, "gpu", base_us + self.clock.ms(base, s) * 1e3, ms * 1e3, args))
        self._host = []
        events.sort(key=lambda ev: (ev["tid"], ev["ts"]))
        return self.metadata() + events

    def metadata(self) -> list[dict]:
        out = [{"name": "process_name", "ph": "M", "pid": self.rank, "tid": 0, "args": {"name": self.label}},
               {"name": "process_sort_index", "ph": "M", "pid": self.rank, "tid": 0, "args": {"sort_index": self.rank}}]
        out += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": lane}}
                for lane, tid in LANES.items()]
        return out

    def _event(self, name: str, lane: str, ts: float, dur: float, args: dict | None) -> dict:
        return {"name": name, "ph": "X", "pid": self.rank, "tid": LANES[lane], "ts": ts, "dur": max(0.0, dur),
                "args": args or {}}


def write_trace(events: list[dict], path: str | Path) -> Path:
    """The file: {"traceEvents": [...]} with time shifted so the first slice starts at 0."""
    slices = [e for e in events if e["ph"] == "X"]
    t0 = min((e["ts"] for e in slices), default=0.0)
    out = [dict(e, ts=round(e["ts"] - t0, 3), dur=round(e["dur"], 3)) if e["ph"] == "X" else e for e in events]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))
    return path


def bubble_fractions(events: list[dict]) -> dict[int, float]:
    """Per stage (pid): the share of the traced window (first slice start to last slice end, over
    every stage) in which its GPU lane ran nothing."""
    slices = [e for e in events if e["ph"] == "X"]
    if not slices:
        return {}
    start = min(e["ts"] for e in slices)
    window = max(e["ts"] + e["dur"] for e in slices) - start
    busy: dict[int, float] = {}
    for e in slices:
        busy.setdefault(e["pid"], 0.0)
        if e["tid"] == LANES["gpu"]:
            busy[e["pid"]] += e["dur"]
    return {pid: (1 - b / window if window > 0 else 0.0) for pid, b in sorted(busy.items())}


class StageProfiler:
    """A stage's side of LLM.start_profile / stop_profile: its Tracer and, on request, per-layer
    clocks (for the automatic split). Commands arrive with a stats request:
    {"op": "start", "trace": bool, "layers": bool} or {"op": "stop", "dir": folder}; stop writes the
    stage's slices to <dir>/stage<rank>.json and returns what goes into its stats entry."""

    def __init__(self, stage, rank: int):
        self.stage, self.rank = stage, rank
        label = f"stage {rank} (layers {stage.start}-{stage.end - 1})"
        self.tracer = Tracer(rank, stage.device, label)
        self.clock = None

    def apply(self, cmd: dict | None) -> dict:
        if not cmd:
            return {}
        if cmd["op"] == "start":
            if cmd.get("layers"):
                from .clock import LayerClock
                self.clock = LayerClock(self.stage)
            if cmd.get("trace", True):
                self.tracer.start()
            return {}
        out: dict = {}
        if self.clock is not None:
            ms = self.clock.remove()
            out["eager_ms"] = ms.pop(-1, 0.0)
            out["clock"] = "cuda" if self.stage.device.type == "cuda" else "cpu"
            out["layer_ms"] = {str(k): v for k, v in ms.items()}
            self.clock = None
            if self.stage.device.type == "cuda":
                out["card_bytes"] = torch.cuda.get_device_properties(self.stage.device).total_memory
        if self.tracer.on and cmd.get("dir"):
            path = Path(cmd["dir"]) / f"stage{self.rank}.json"
            path.write_text(json.dumps(self.tracer.stop()))
            out["trace_file"] = str(path)
        elif self.tracer.on:
            self.tracer.stop()
        return out


def start_profile(llm, layers: bool = False) -> None:
    """LLM.start_profile: every stage starts recording (behind the micro-batches in flight)."""
    llm.stats(profile={"op": "start", "trace": True, "layers": layers})


def stop_profile(llm, path: str | Path | None = None, reset: bool = False, per_step: bool = False) -> dict:
    """LLM.stop_profile: every stage stops and writes its slices; they are merged into `path` (none:
    not kept). Returns {"path", "bubble": {stage: fraction}, "stages": the stats entries, taken with
    reset / per_step as LLM.stats}."""
    import shutil
    import tempfile
    tmp = tempfile.mkdtemp(prefix="moepipe-trace-")
    try:
        stats = llm.stats(reset=reset, per_step=per_step, profile={"op": "stop", "dir": tmp})
        files = [s["trace_file"] for s in stats["stages"] if "trace_file" in s]
        events = []
        for f in files:
            events += json.loads(Path(f).read_text())
        if path is not None:
            write_trace(events, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"path": None if path is None else str(path), "bubble": bubble_fractions(events),
            "stages": stats["stages"]}
