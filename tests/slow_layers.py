"""Test hook: chosen layers of a CPU Stage spin CPU time in each forward, to build an unbalanced
pipeline. In this process: install_slow_layers(stage, {layer: ms}). In the stage workers an LLM
spawns: inject_into_workers(monkeypatch, tmp_path, "layer:ms[,layer:ms]"), which puts a
sitecustomize on the workers' PYTHONPATH that wraps loader.load.load_stage."""
from __future__ import annotations

import os
import time
from pathlib import Path

SLOW_ENV = "MOEPIPE_TEST_SLOW_LAYERS"
_HERE = Path(__file__).resolve().parent


def parse_slow_layers(text: str | None) -> dict[int, float]:
    """'1:20,3:5' -> {1: 20.0, 3: 5.0} (layer: ms of CPU time per forward)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        i, ms = item.split(":")
        out[int(i)] = float(ms)
    return out


def _spin(ms: float) -> None:
    # this thread's CPU time: the process's also counts torch's worker threads, so it can pass 30 ms
    # while less than 30 ms of wall time has gone by
    end = time.thread_time() + ms / 1e3
    while time.thread_time() < end:
        pass


def install_slow_layers(stage, slow: dict[int, float]) -> None:
    """Layers of `slow` spin for that many ms of CPU time before each forward (CPU stages only)."""
    if stage.device.type != "cpu":
        return
    for name, layer in stage.layers.items():
        if int(name) in slow:
            layer.register_forward_pre_hook(lambda m, a, ms=slow[int(name)]: _spin(ms))


def patch_load_stage() -> None:
    """In a worker (from sitecustomize): every Stage loaded gets the layers of SLOW_ENV slowed."""
    slow = parse_slow_layers(os.environ.get(SLOW_ENV))
    if not slow:
        return
    import loader.load as ll
    real = ll.load_stage

    def load_stage(*a, **k):
        stage = real(*a, **k)
        install_slow_layers(stage, slow)
        return stage

    ll.load_stage = load_stage


def inject_into_workers(monkeypatch, tmp_path: Path, spec: str) -> None:
    """Stage workers started after this call load their stages with the layers of spec slowed
    (monkeypatch: pytest's fixture, or a pytest.MonkeyPatch.context() around a module fixture's start)."""
    site = tmp_path / "slow_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import slow_layers\nslow_layers.patch_load_stage()\n")
    path = [str(site), str(_HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.setenv(SLOW_ENV, spec)
