"""Timeline trace: the file is Chrome trace-event JSON (what ui.perfetto.dev and chrome://tracing
read), with slices on every stage, time only moving forward on each lane, and the documented names."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from engine.runtime.trace import LANES, NAMES, Tracer, bubble_fractions, forward_name, write_trace


def check_trace(path: Path, stages: int) -> dict:
    """Validate the file against the trace-event format; returns it parsed."""
    d = json.loads(Path(path).read_text())
    assert isinstance(d, dict) and isinstance(d["traceEvents"], list)
    procs = {e["pid"]: e["args"]["name"] for e in d["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(procs) == list(range(stages))
    lanes: dict[tuple[int, int], list[dict]] = {}
    for e in d["traceEvents"]:
        assert e["ph"] in ("X", "M"), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert isinstance(e["name"], str) and e["name"] in NAMES, e["name"]
            assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float))
            assert e["ts"] >= 0 and e["dur"] >= 0 and e["tid"] in LANES.values()
            lanes.setdefault((e["pid"], e["tid"]), []).append(e)
    assert {pid for pid, _ in lanes} == set(range(stages)), "a stage without slices"
    for (pid, tid), evs in lanes.items():  # listed in time order, never overlapping on one lane
        for a, b in zip(evs, evs[1:]):
            assert b["ts"] >= a["ts"] + a["dur"] - 1e-3, (pid, tid, a, b)
    return d


def test_tracer_writes_valid_trace(tmp_path):
    tracers = [Tracer(r, "cpu", f"stage {r} (layers {2 * r}-{2 * r + 1})") for r in range(2)]
    off = Tracer(2)
    assert off.host_start() is None and off.gpu_start() is None  # off: nothing recorded
    off.gpu_end(None, "forward decode")
    for t in tracers:
        t.start()
    for mb in range(3):
        for r, t in enumerate(tracers):
            w = t.host_start()
            time.sleep(0.001)
            t.host_end(w, "wait", {"mb": mb})
            g = t.gpu_start()
            time.sleep(0.002)
            q = 4 if mb == 0 else 1
            t.gpu_end(g, forward_name(q), {"mb": mb, "tokens": q, "rows": 1})
            s = t.host_start()
            t.host_end(s, "send", {"mb": mb, "to": r + 1})
    assert [e for e in off.stop() if e["ph"] == "X"] == []
    events = [e for t in tracers for e in t.stop()]
    assert not tracers[0].on and tracers[0].host_start() is None
    d = check_trace(write_trace(events, tmp_path / "t.json"), 2)
    x = [e for e in d["traceEvents"] if e["ph"] == "X"]
    assert min(e["ts"] for e in x) == 0
    fw = [e for e in x if e["name"].startswith("forward")]
    assert [e["name"] for e in fw if e["pid"] == 1] == ["forward prefill", "forward decode", "forward decode"]
    assert [e["args"]["mb"] for e in x if e["pid"] == 0 and e["name"] == "send"] == [0, 1, 2]
    assert all(e["dur"] >= 1500 for e in fw)  # microseconds: each forward slept 2 ms
    b = bubble_fractions(d["traceEvents"])
    assert set(b) == {0, 1} and all(0 < v < 1 for v in b.values())




def test_pipeline_trace(tmp_path):
    """Three CPU stages under load: every stage has forward slices, stage 0 schedules and sends,
    the last stage samples; the trace validates and profiling off leaves no slices behind."""
    from engine import LLM, SamplingParams
    from loader.writer import ensure_cached_preset
    with LLM(str(ensure_cached_preset("tiny")), stages=3, device="cpu", verbose=False, kv_cache_gib=0.02) as llm:
        sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        llm.generate([[5, 6, 7]], sp)  # before the profile: not in the trace
        llm.start_profile()
        llm.generate([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12] * 20], sp)
        out = llm.stop_profile(tmp_path / "run.json")
        llm.generate([[5, 6, 7]], sp)  # after: recording is off again
        again = llm.stop_profile(None)
    d = check_trace(tmp_path / "run.json", 3)
    x = [e for e in d["traceEvents"] if e["ph"] == "X"]
    names = {(e["pid"], e["name"]) for e in x}
    for r in range(3):
        assert (r, "forward prefill") in names and (r, "forward decode") in names
    assert {(0, "schedule"), (0, "send"), (0, "wait"), (1, "wait"), (1, "send"), (2, "sample")} <= names
    pre = [e for e in x if e["pid"] == 0 and e["name"] == "forward prefill"]
    assert sum(e["args"]["tokens"] for e in pre) == 8 + 3 + 20  # each prompt token once
    dec = [e for e in x if e["pid"] == 2 and e["name"] == "forward decode"]
    assert all(e["args"]["tokens"] == e["args"]["rows"] for e in dec)
    assert out["path"] == str(tmp_path / "run.json") and set(out["bubble"]) == {0, 1, 2}
    assert all(0 <= b < 1 for b in out["bubble"].values())
    assert again["bubble"] == {}  # nothing recorded while off


def test_profile_command_writes_trace(tmp_path, capsys):
    from engine.__main__ import main
    path = tmp_path / "prof.json"
    assert main(["profile", "--device", "cpu", "--batch", "2", "--prompt-len", "8", "--max-tokens", "3",
                 "--trace", str(path), "--quiet", "--kv-cache-gib", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "bubble %" in out and f"timeline: {path}" in out
    # the last stage's extra work is shown apart: final norm + lm_head, and sampling
    m = re.search(r"final norm \+ lm_head ([0-9.]+) ms, sampling ([0-9.]+) ms", out)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    check_trace(path, 2)
