"""The decode step at 256 rows on a GPU: a captured graph runs it, and neither the forward nor the
sampler (penalties included) synchronizes with the host; a stats read never waits for the device.
GPU only (CUDA graphs, torch.cuda.set_sync_debug_mode); the CPU side of the same logic is in
test_decode_graphs.py and test_clock.py."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.options import EngineOptions
from engine.params import SamplingParams
from engine.runtime.launch import build_rank, resolve_engine

pytestmark = pytest.mark.gpu


def test_256_row_decode_step_replays_a_graph_and_never_syncs():
    from triton import knobs
    hooks = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    try:
        _run_256()
    finally:  # build_rank installs the late-compile watch process-wide: later tests are not requests
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = hooks


def _run_256() -> None:
    # a small pool: the engine otherwise sizes it from free memory, and this process runs other tests after
    args, cfg, _ = resolve_engine("tiny", EngineOptions(load_format="dummy", device="cuda", dtype="bfloat16",
                                                        max_num_seqs=256, max_model_len=512, verbose=False,
                                                        kv_cache_gib=2.0))
    r = build_rank(args, 0, 0)
    try:
        _steps(r, cfg)
    finally:
        del r
        torch.cuda.empty_cache()


def _steps(r, cfg) -> None:
    eng, w = r.engine, r.worker
    sp = SamplingParams(max_tokens=60, temperature=0.8, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.3,
                        presence_penalty=0.2, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(256):
        eng.add(i, torch.randint(3, cfg.vocab_size, (int(torch.randint(8, 64, (1,), generator=g)),),
                                 generator=g).tolist(), sp)
    sched = eng.scheduler
    while sched.waiting or any(s.num_scheduled < s.prompt_len or not s.output_ids for s in sched.running):
        eng.step()
    replays, run, graph_run = [], w.run, w.graphs.run

    def counted(x, view, *a, **k):
        replays.append(view.B)
        return graph_run(x, view, *a, **k)

    def strict(x, view):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(x, view)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    w.graphs.run, w.run = counted, strict
    for _ in range(6):
        eng.step()
    assert replays and max(replays) == 256, replays
    assert w.late.stats()["late_compiles"] == 0, w.late.stats()["late_kernels"]


def test_stats_never_waits_for_the_device():
    from engine.runtime.clock import StageTimer
    timer = StageTimer(torch.device("cuda"))
    torch.cuda.synchronize()
    t = timer.start()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of spinning on the device
    timer.stop(t, 1)
    t0 = time.perf_counter()
    got = timer.collect(reset=False)
    waited = time.perf_counter() - t0
    assert got["pending_steps"] == 1 and got["steps"] == 0 and waited < 0.2, (got, waited)
    torch.cuda.synchronize()
    assert timer.collect(reset=False)["steps"] == 1


# two whole fresh prompts beside the decodes (SDPA; async scheduling would run them in a step of their
# own, the decodes being in flight); 48-token steps: a fresh chunk (SDPA), then chunks behind a prefix (paged)
@pytest.mark.parametrize("budget,async_scheduling", [(4096, False), (48, True)])
def test_mixed_step_never_syncs(budget, async_scheduling):
    """A step of prefill chunks with decodes riding along runs eager; its attention's decode rows are
    indexed once per micro-batch, without a blocking host copy in any layer."""
    from engine.runtime.step_plan import offsets
    args, cfg, _ = resolve_engine("tiny", EngineOptions(load_format="dummy", device="cuda", dtype="bfloat16",
                                                        max_num_seqs=16, max_model_len=512, verbose=False,
                                                        kv_cache_gib=0.5, max_num_batched_tokens=budget,
                                                        async_scheduling=async_scheduling))
    r = build_rank(args, 0, 0)
    try:
        eng, w = r.engine, r.worker
        sp = SamplingParams(max_tokens=40, ignore_eos=True)
        g = torch.Generator().manual_seed(1)
        prompt = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        for i in range(4):
            eng.add(i, prompt(20), sp)
        while any(not s.output_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        mixed, run = [], w.run

        def strict(x, view):
            qlens = np.diff(view.host[slice(*offsets(view.header)["query_start"])])
            if qlens.max() > 1 and qlens.min() == 1:  # prefill chunks and decode rows in one step
                mixed.append(qlens.tolist())
            torch.cuda.set_sync_debug_mode("error")
            try:
                return run(x, view)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        w.run = strict
        for i in range(4, 6):
            eng.add(i, prompt(120), sp)
        for _ in range(8):
            eng.step()
        assert mixed, "no step carried prefill with decodes"
    finally:
        del r
        torch.cuda.empty_cache()
