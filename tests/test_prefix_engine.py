"""Prefix caching end to end on CPU (tiny random model, gloo): greedy tokens equal those of an
engine without the cache on 1, 2 and 3 stages for prefixes ending inside a block and on a block
boundary, follow-up turns and repeated blocks; preemption in a pool so small that cached blocks are
evicted; aborts in prefill and decode; cache_salt; reset_prefix_cache; the layers='auto' restart;
a small soak. The hit counts are checked, so each test fails without the cache."""
import random
import time

import pytest
import torch

from engine import LLM, SamplingParams
from loader.presets import preset_config
from loader.writer import write_checkpoint
from slow_layers import inject_into_workers

BS = 16
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
KV_GIB_PER_BLOCK = BS * 2 * 2 * 2 * 32 * 4 / 2**30  # tiny on 2 stages: 2 layers x (k, v) x 2 kv heads x 32 x fp32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-prefix")
    write_checkpoint(d, preset_config("tiny"), seed=5)
    return str(d)


@pytest.fixture(scope="module")
def ref(model):
    """The reference: one stage, no prefix cache."""
    with LLM(model, block_size=BS, stages=1, verbose=False, enable_prefix_caching=False) as llm:
        yield llm


def _rand(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=g).tolist()


def _sched(llm) -> dict:
    """The scheduler's counters once nothing is running and the micro-batches of aborted requests
    have drained (their blocks come back when the last completes); the last snapshot after 20 s."""
    deadline = time.monotonic() + 20
    while True:
        s = llm.stats()["scheduler"]
        if (s["running"], s["waiting"], s["free_blocks"]) == (0, 0, s["num_blocks"]) or time.monotonic() > deadline:
            return s


class Written:
    """Which full blocks an engine has cached: every call's prompt plus all but its last token."""

    def __init__(self):
        self.prefixes: set[tuple[int, ...]] = set()

    def hits(self, prompt: list[int]) -> int:
        k = 0
        while k < (len(prompt) - 1) // BS and tuple(prompt[:(k + 1) * BS]) in self.prefixes:
            k += 1
        return k * BS

    def add(self, tokens: list[int]) -> None:
        self.prefixes.update(tuple(tokens[:k * BS]) for k in range(1, len(tokens) // BS + 1))


def _turns(g: torch.Generator) -> list[list[list[int]]]:
    """Calls of prompts: a 40-token prefix (ends inside a block) and a 48-token one (on a boundary)
    with new tails, the same prompts again whole, and a block repeated at three depths."""
    p40, p48, x = _rand(g, 40), _rand(g, 48), _rand(g, BS)
    t = [_rand(g, n) for n in (10, 7, 3, 20, 5)]
    return [[p40 + t[0], p48 + t[1], x + x],
            [p40 + t[2], p48 + t[3], p48, p40 + t[0], x + x + x + t[4]],
            [p48[:33], p40[:32] + t[4], x + x + x + x]]


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_tokens_equal_without_the_cache_and_hits_are_counted(model, ref, stages):
    g = torch.Generator().manual_seed(stages)
    calls = _turns(g)
    written = Written()
    with LLM(model, block_size=BS, stages=stages, verbose=False) as llm:
        prev = None
        for i, prompts in enumerate(calls + [None]):
            if prompts is None:  # a follow-up turn: an earlier prompt, its answer and a question
                prompts = [calls[0][1] + prev[1] + _rand(g, 9), calls[0][2] + prev[2] + _rand(g, 4)]
            want = [o.token_ids for o in ref.generate(prompts, GREEDY)]
            before = llm.stats()["scheduler"]
            outs = llm.generate(prompts, GREEDY)
            after = _sched(llm)
            assert [o.token_ids for o in outs] == want, f"call {i}, stages={stages}"
            hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
            assert hits == sum(written.hits(p) for p in prompts), f"call {i}"
            assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == sum(map(len, prompts))
            for p, o in zip(prompts, outs):
                written.add(p + o.token_ids[:-1])
            prev = [o.token_ids for o in outs] if i == 0 else prev
        assert llm.stats()["scheduler"]["prefix_cache_hits"] >= 400
        assert after["free_blocks"] == after["num_blocks"] and after["cached_blocks"] > 0
    assert ref.stats()["scheduler"]["prefix_cache_hits"] == 0 and ref.stats()["scheduler"]["cached_blocks"] == 0


def test_n_samples_and_a_new_prefix_sent_twice_compute_it_once(model, ref):
    """The n samples of one prompt, and one new prompt twice in one call, compute their prefix once:
    the followers start after every full block but the one of their last token (without following
    they would all compute it beside the first, in the same micro-batch), and match the reference."""
    g = torch.Generator().manual_seed(31)
    p, q = _rand(g, 56), _rand(g, 40)  # followers find (56 - 1) // 16 = 3 and (40 - 1) // 16 = 2 blocks
    with LLM(model, block_size=BS, stages=2, verbose=False) as llm:
        before = _sched(llm)["prefix_cache_hits"]
        outs = llm.generate([p], SamplingParams(n=3, max_tokens=10, temperature=0.0, ignore_eos=True))
        after = _sched(llm)["prefix_cache_hits"]
        assert after - before == 2 * 48
        assert [c.token_ids for c in outs[0].outputs] == [ref.generate([p], GREEDY)[0].token_ids] * 3
        twice = llm.generate([q, q], GREEDY)
        assert _sched(llm)["prefix_cache_hits"] - after == 32
        assert [o.token_ids for o in twice] == [ref.generate([q], GREEDY)[0].token_ids] * 2
    with LLM(model, block_size=BS, stages=2, verbose=False, enable_prefix_caching=False) as off:
        off.generate([q, q], GREEDY)
        assert _sched(off)["prefix_cache_hits"] == 0


@pytest.fixture(scope="module")
def small(model, tmp_path_factory):
    """2 stages, a pool of 16 blocks (256 tokens): concurrent requests preempt each other. Layer 0
    spins 10 ms per forward, so a prefill of several chunks lasts long enough to abort it."""
    with pytest.MonkeyPatch.context() as mp:  # the workers keep the hook; this process's env is restored
        inject_into_workers(mp, tmp_path_factory.mktemp("slow"), "0:10")
        llm = LLM(model, block_size=BS, stages=2, verbose=False, kv_cache_gib=16 * KV_GIB_PER_BLOCK, max_num_batched_tokens=32,
                  max_num_seqs=8)
    with llm:
        assert llm.info["num_blocks"] == 16
        yield llm


def test_preemption_in_a_small_pool_evicts_cached_blocks_and_stays_exact(small, ref):
    g = torch.Generator().manual_seed(7)
    pre = _rand(g, 40)
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    small.stats(reset=True)
    for wave in range(2):
        prompts = [pre + _rand(g, n) for n in (0, 5, 16, 9, 20, 1)]
        want = [o.token_ids for o in ref.generate(prompts, sp)]
        assert [o.token_ids for o in small.generate(prompts, sp)] == want, f"wave {wave}"
    s = _sched(small)
    assert s["preemptions"] > 0 and s["prefix_cache_evictions"] > 0 and s["prefix_cache_hits"] >= 32, s
    assert s["free_blocks"] == s["num_blocks"] == 16


def _wait(llm, cond, what: str) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = llm.stats()["scheduler"]
        if cond(s):
            return s
    raise AssertionError(f"never saw {what}")


def test_aborts_in_prefill_and_decode_leave_a_correct_cache(small, ref):
    g = torch.Generator().manual_seed(8)
    prompt = _rand(g, 200)  # 7 chunks of 32 tokens
    slow = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = ref.generate([prompt], GREEDY)[0].token_ids
    small.reset_prefix_cache()
    small.stats(reset=True)
    seen = []
    a = small.submit(prompt, slow, on_event=seen.append)
    _wait(small, lambda s: s["running"] == 1 and s["prefix_cache_queries"] > 0, "the prefill start")
    small.abort([a.request_id])
    assert seen == []  # aborted in its prefill: no token had come out
    b = small.submit(prompt, slow)
    next(b)
    next(b)
    b.close()  # in decode
    s = _sched(small)
    assert (s["running"], s["free_blocks"]) == (0, 16)
    out = small.generate([prompt], GREEDY)[0].token_ids
    assert out == want
    s = _sched(small)
    assert s["prefix_cache_hits"] >= 128, s  # the aborted requests' blocks were kept
    assert s["free_blocks"] == 16


def test_cache_salt_isolates_and_reset_drops(ref):
    g = torch.Generator().manual_seed(9)
    prompt = _rand(g, 50)
    want = ref.generate([prompt], GREEDY)[0].token_ids

    def hits(salt):
        before = ref_on.stats()["scheduler"]["prefix_cache_hits"]
        assert ref_on.generate([prompt], GREEDY, cache_salt=salt)[0].token_ids == want
        return ref_on.stats()["scheduler"]["prefix_cache_hits"] - before

    with LLM(ref.folder, block_size=BS, stages=1, verbose=False) as ref_on:
        assert [hits(s) for s in ("a", "b", None, "a", "b", None)] == [0, 0, 0, 48, 48, 48]
        s = ref_on.submit(prompt, GREEDY, cache_salt="c")
        assert [e.token_id for e in s] == want
        assert ref_on.stats()["scheduler"]["prefix_cache_hits"] == 144
        assert ref_on.reset_prefix_cache() is True
        assert ref_on.stats()["scheduler"]["cached_blocks"] == 0
        assert hits("a") == 0 and hits("a") == 48
        for bad in ("", 5):
            with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
                ref_on.generate([prompt], GREEDY, cache_salt=bad)
        with pytest.raises(ValueError, match="1 cache_salt values for 2 prompts"):
            ref_on.generate([prompt, prompt], GREEDY, cache_salt=["a"])
        assert ref_on.generate([prompt, prompt], GREEDY, cache_salt=["a", "z"])[1].token_ids == want
    assert ref.reset_prefix_cache() is True  # nothing cached without the cache


def test_options_validate_the_switch():
    from engine.options import EngineOptions, add_option_flags, options_from_args
    import argparse
    p = argparse.ArgumentParser()
    add_option_flags(p)
    assert options_from_args(p.parse_args([])).enable_prefix_caching is True
    assert options_from_args(p.parse_args(["--no-enable-prefix-caching"])).enable_prefix_caching is False
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False"):
        EngineOptions(enable_prefix_caching="no").validate()


def test_auto_split_restart_keeps_caching(model, ref, monkeypatch, tmp_path):
    """layers='auto' restarts the stages on another split: the new engine caches and stays exact."""
    inject_into_workers(monkeypatch, tmp_path, "0:80")
    g = torch.Generator().manual_seed(10)
    pre = _rand(g, 33)
    prompts = [pre + _rand(g, 4), pre + _rand(g, 6)]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in ref.generate(prompts, sp)]
    with LLM(model, block_size=BS, stages=2, device="cpu", layers="auto", kv_cache_gib=0.02, verbose=False) as llm:
        assert llm.auto_split["after"] != llm.auto_split["before"]
        llm.stats(reset=True)
        assert [llm.generate([p], sp)[0].token_ids for p in prompts] == want
        assert llm.stats()["scheduler"]["prefix_cache_hits"] == 32


@pytest.mark.slow
def test_small_soak_from_shared_prefixes_with_aborts(small, ref):
    """96 requests from three prefixes (with salts and follow-up tails), in waves, 10% abandoned
    midway, on the small pool: each finished one equals the reference."""
    rng = random.Random(22)
    g = torch.Generator().manual_seed(22)
    prefixes = [_rand(g, 37), _rand(g, 48), _rand(g, 64)]
    small.stats(reset=True)
    reqs = []
    for i in range(96):
        p = rng.choice(prefixes) + _rand(g, rng.choice([0, 2, 11, 30]))
        reqs.append((p, SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0, ignore_eos=True),
                     rng.choice([None, "t"])))
    want = [o.token_ids for o in ref.generate([p for p, _, _ in reqs], [sp for _, sp, _ in reqs])]
    for w in range(0, 96, 24):
        streams = {i: small.submit(reqs[i][0], reqs[i][1], cache_salt=reqs[i][2]) for i in range(w, w + 24)}
        for i, s in streams.items():
            if i % 10 == 3 and reqs[i][1].max_tokens > 2:
                next(s)
                s.close()
                continue
            assert [e.token_id for e in s] == want[i], f"request {i}"
    s = _sched(small)
    assert s["free_blocks"] == 16 and s["prefix_cache_hits"] > s["prefix_cache_queries"] // 4, s
