"""Soak (CPU, 2 stages): 300 requests of mixed lengths and sampling parameters in waves, 10% of the
streams abandoned midway (close, garbage collection, LLM.abort), some refused as too long, a pool
small enough to force preemptions. Every finished greedy or seeded request equals its
one-at-a-time output (an in-process 1-stage engine), the pool is fully free at the end and no
stage process is left."""
import gc
import os
import random
import time

import pytest

from engine import LLM, SamplingParams
from engine.runtime.launch import build_rank, resolve_engine
from engine.options import EngineOptions
from loader.writer import ensure_cached_preset

pytestmark = pytest.mark.slow
BLOCK = 16
BLOCKS = 48  # 768 tokens: long requests preempt each other
KV_GIB = BLOCKS * BLOCK * 2 * 2 * 2 * 32 * 4 / 2**30  # tiny: 2 layers/stage x (k, v) x 2 kv heads x 32 x fp32
N, WAVES = 300, 6


def _requests(rng: random.Random):
    reqs = []
    for i in range(N):
        kind = rng.random()
        if i % 10 == 3:  # abandoned midway: long enough to still be running
            reqs.append(("abandon", rng.randint(3, 40), SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)))
        elif i % 37 == 5:  # can never fit the pool
            reqs.append(("refuse", BLOCKS * BLOCK - 10, SamplingParams(max_tokens=20, temperature=0)))
        elif kind < 0.45:
            reqs.append(("greedy", rng.randint(1, 60), SamplingParams(max_tokens=rng.randint(1, 12), temperature=0,
                                                                      ignore_eos=rng.random() < 0.7)))
        elif kind < 0.75:
            reqs.append(("seeded", rng.randint(1, 60), SamplingParams(
                max_tokens=rng.randint(1, 12), temperature=rng.choice([0.6, 1.0, 1.3]), top_k=rng.choice([0, 5, 50]),
                top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]), seed=rng.randint(0, 2**40),
                ignore_eos=True)))
        else:
            reqs.append(("free", rng.randint(1, 60), SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.8,
                                                                    top_p=0.95)))
    prompts = [[rng.randint(3, 500) for _ in range(n)] for _, n, _ in reqs]
    return [(k, p, sp) for (k, _, sp), p in zip(reqs, prompts)]


def _one_at_a_time(model: str, reqs) -> dict[int, list[int]]:
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_alone(model, reqs)
    finally:
        torch.set_num_threads(threads)


def _run_alone(model: str, reqs) -> dict[int, list[int]]:
    # the plain path as reference: no async scheduling (the soak itself runs with it)
    args, _, _ = resolve_engine(model, EngineOptions(stages=1, verbose=False, block_size=BLOCK, kv_cache_gib=KV_GIB,
                                                     device="cpu", async_scheduling=False))
    engine = build_rank(args, 0, 0).engine
    out = {}
    for i, (kind, prompt, sp) in enumerate(reqs):
        if kind not in ("greedy", "seeded"):
            continue
        engine.add(10_000 + i, prompt, sp)
        toks = []
        while engine.has_work:
            toks += [t for _, t, *_ in engine.step()]
        out[i] = toks
    return out


def test_soak():
    t0 = time.monotonic()
    model = str(ensure_cached_preset("tiny"))
    reqs = _requests(random.Random(2026))
    got: dict[int, list[int]] = {}
    refused = abandoned = 0
    with LLM(model, stages=2, verbose=False, block_size=BLOCK, kv_cache_gib=KV_GIB, max_num_seqs=32,
             max_num_batched_tokens=256) as llm:
        assert llm.info["num_blocks"] == BLOCKS
        pids = [p.pid for p in llm.client.procs]
        per_wave = N // WAVES
        for w in range(WAVES):
            wave = range(w * per_wave, (w + 1) * per_wave)
            streams = {}
            for i in wave:
                kind, prompt, sp = reqs[i]
                if kind == "refuse":
                    with pytest.raises(ValueError, match="exceeds the whole KV cache"):
                        llm.submit(prompt, sp)
                    refused += 1
                    continue
                streams[i] = llm.submit(prompt, sp)
            for i in list(streams):
                s = streams.pop(i)
                kind = reqs[i][0]
                if kind == "abandon":
                    next(s)
                    next(s)
                    how = i % 3
                    if how == 0:
                        s.close()
                    elif how == 1:
                        llm.abort([s.request_id])
                        assert list(s) == []
                    abandoned += 1
                    del s  # how == 2: garbage collection aborts it
                    gc.collect()
                    continue
                toks = [ev.token_id for ev in s]
                assert 1 <= len(toks) <= reqs[i][2].max_tokens
                got[i] = toks
        deadline = time.monotonic() + 20
        while True:
            sched = llm.stats()["scheduler"]
            if (sched["running"], sched["waiting"]) == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (sched["running"], sched["waiting"], sched["free_blocks"]) == (0, 0, BLOCKS), sched
        assert sched["preemptions"] > 0, "the pool was meant to be small enough to preempt"
    assert refused >= 5 and abandoned == 30
    time.sleep(0.5)
    assert not [p for p in pids if _alive(p)], "a stage process outlived close()"
    ref = _one_at_a_time(model, reqs)
    bad = [i for i in ref if got[i] != ref[i]]
    assert not bad, f"{len(bad)} of {len(ref)} requests differ from one-at-a-time, e.g. {bad[:3]}"
    assert len(ref) > 150
    print(f"soak: {N} requests in {time.monotonic() - t0:.1f} s, {sched['preemptions']} preemptions")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
