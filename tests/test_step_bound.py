"""max_step_ms: the modeled step cost (engine/runtime/chunking.py StepCost) and the scheduler's bound
on the prefill tokens that ride with running decodes; the engine's greedy tokens do not change."""
from __future__ import annotations

import random

import pytest
import torch

from engine.params import SamplingParams
from engine.runtime.block_manager import BlockManager
from engine.runtime.chunking import QWEN3_30B_FIT, StepCost, chunk_pairs
from engine.runtime.scheduler import Scheduler
from engine.runtime.sequence import Sequence

COST = StepCost(48, 128, 8)


def test_fit_tokens_is_the_largest_that_fits():
    rng = random.Random(0)
    for _ in range(300):
        tokens, prefix, limit = rng.randrange(0, 300), rng.randrange(0, 5000), rng.randrange(0, 3000)
        pairs = tokens * rng.randrange(1, 2000)
        bound = rng.uniform(1, 200)
        naive = max((n for n in range(limit + 1)
                     if n == 0 or COST.ms(tokens + n, pairs + n * prefix + n * (n + 1) / 2) <= bound), default=0)
        assert COST.fit_tokens(tokens, pairs, prefix, limit, bound) == naive


def test_step_cost_terms():
    c = QWEN3_30B_FIT
    # a dense model reads all its weights at any token count
    dense = StepCost(2, 0, 0)
    assert dense.ms(3, 10) == pytest.approx(2 * (c.c0 + 3 * c.a + 10 * c.b))
    # one token of a 128-expert top-8 model reads 8 experts' weights
    assert COST.ms(1, 1) == pytest.approx(48 * (c.c0 * 8 / 128 + c.a + c.b))
    assert COST.ms(0, 0) == 0.0


def _seq(i, n, max_tokens):
    """Sequence i of n prompt tokens that share no prefix with another's."""
    return Sequence(i, list(range(100_000 * i + 1, 100_000 * i + n + 1)),
                    SamplingParams(max_tokens=max_tokens, temperature=0), ())


def _cost_of(mb) -> float:
    return COST.ms(mb.num_tokens, sum(chunk_pairs(c.length, c.start) for c in mb.chunks))


def _drive(s: Scheduler, limit=5000):
    """One micro-batch in flight, as the engine without async scheduling; returns (mb, decoding
    sequences when it was scheduled) per step."""
    log = []
    while s.has_work and limit:
        decoding = sum(1 for q in s.running if q.num_scheduled >= q.prompt_len)
        mb = s.schedule()
        assert mb is not None
        log.append((mb, decoding))
        s.complete(mb, [7] * len(mb.sampled))
        limit -= 1
    return log


def test_mixed_steps_stay_within_the_bound_and_prefill_progresses():
    bound = 80.0
    s = Scheduler(BlockManager(4096, 16), max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=20000,
                  max_step_ms=bound, step_cost=COST)
    seqs = [_seq(i, 1000 + 37 * i, 40) for i in range(24)]
    for q in seqs[:8]:
        s.add(q)
    log = _drive(s, limit=1)  # the first prompts: nothing decodes yet, the whole token budget
    assert log[0][0].num_tokens == 8192 and log[0][1] == 0
    for q in seqs[8:]:
        s.add(q)
    log += _drive(s)
    assert all(q.finish_reason == "length" for q in seqs)  # every prompt prefilled, every sequence done
    mixed = [(mb, d) for mb, d in log if d > 0 and any(not c.sample or c.length > 1 for c in mb.chunks)]
    assert len(mixed) >= 8 and s.step_bound_cuts > 0
    for mb, d in mixed:
        assert _cost_of(mb) <= bound, [(c.seq.seq_id, c.start, c.length) for c in mb.chunks]
        decodes = sum(1 for c in mb.chunks if c.start >= c.seq.prompt_len)
        assert decodes == d  # every decoding sequence rides in every mixed step
    # unbounded, the same work takes bigger steps
    assert max(mb.num_tokens for mb, d in mixed) < 8192


def test_a_bound_that_leaves_a_sliver_takes_prefill_at_the_token_budget():
    """A bound that leaves a step's first chunk no tokens, or so few that the step would prefill at
    under MIN_PREFILL_EFFICIENCY of the token budget's chunk's rate (a mixed step runs eager: its
    fixed cost swamps a small chunk), cannot hold at a useful rate: such a step takes its chunk at
    the token budget, counted in step_bound_over, rather than a block or a few tokens (under which
    prompts would queue without end); a bound that leaves a worthwhile chunk still cuts it."""
    for bound, want in ((1.0, "whole"), (48.0, "cut")):
        s = Scheduler(BlockManager(4096, 16), max_num_seqs=64, max_num_batched_tokens=512, max_model_len=20000,
                      max_step_ms=bound, step_cost=COST)
        a, b = _seq(0, 20, 200), _seq(1, 1300, 5)
        s.add(a)
        _drive(s, limit=2)  # a decodes
        s.add(b)
        log = _drive(s)
        lens = [c.length for mb, _ in log for c in mb.chunks if c.seq is b and c.start < b.prompt_len]
        assert b.finish_reason == "length" and sum(lens) == 1300
        snap = s.snapshot()
        if want == "whole":  # 1 ms: nothing fits; 511 tokens beside a's decode, the token budget, in three chunks
            assert lens == [511, 511, 278] and snap["step_bound_over"] == 3 and snap["step_bound_cuts"] == 0
        else:
            assert max(lens) < 511 and snap["step_bound_over"] == 0 and snap["step_bound_cuts"] > 0


def test_an_infeasible_bound_keeps_a_closed_loop_of_clients_moving():
    """64 clients of 1024 -> 64 tokens, each sending its next prompt when one ends, with steps
    costed as the fit says: a 20 ms bound (below the 64 decodes' own modeled cost) or one at about
    that cost finishes the work in about as many steps as no bound, not a block or a few tokens of
    prefill a step."""
    def run(bound):
        s = Scheduler(BlockManager(20000, 16), max_num_seqs=512, max_num_batched_tokens=8192, max_model_len=20000,
                      max_step_ms=bound, step_cost=COST)
        ids = iter(range(1, 10_000))
        sent = [_seq(next(ids), 1024, 64) for _ in range(64)]
        for q in sent:
            s.add(q)
        steps = done = 0
        while s.has_work and steps < 20_000:
            mb = s.schedule()
            s.complete(mb, [7] * len(mb.sampled))
            steps += 1
            for c in mb.chunks:
                if c.seq.finish_reason and not getattr(c.seq, "counted", False):
                    c.seq.counted, done = True, done + 1
                    if len(sent) < 128:
                        sent.append(_seq(next(ids), 1024, 64))
                        s.add(sent[-1])
        return steps, done, s.snapshot()
    free, _, _ = run(None)
    for bound in (20.0, 45.0):  # 45: at about the 64 decodes' own cost, where a step had room for a few tokens
        steps, done, snap = run(bound)
        assert done == 128 and (bound > 20 or snap["step_bound_over"] > 0)
        assert steps <= 1.2 * free, (bound, steps, free)


def test_off_by_default_and_at_zero():
    for kw in ({}, {"max_step_ms": 0, "step_cost": COST}):
        s = Scheduler(BlockManager(4096, 16), max_num_seqs=8, max_num_batched_tokens=8192, max_model_len=20000, **kw)
        s.add(_seq(0, 10, 50))
        _drive(s, limit=2)
        s.add(_seq(1, 5000, 2))
        mb = s.schedule()
        assert [c.length for c in mb.chunks] == [1, 5000] and s.step_bound_cuts == 0


def test_engine_greedy_tokens_unchanged_by_the_bound():
    import torch

    from engine import LLM
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 90, 140, 9, 64)]
    # unequal lengths: a sequence still decodes when the next prompt is admitted
    sp = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (4, 12, 7, 16, 9)]
    out = {}
    for ms in (0.0, 2.0):  # 2 modeled ms: about the tiny model's decode steps
        with LLM("tiny", load_format="dummy", device="cpu", max_num_seqs=2, max_step_ms=ms, verbose=False) as llm:
            out[ms] = [o.token_ids for o in llm.generate(prompts, sp)]
            sched = llm.stats()["scheduler"]
            cuts = sched["step_bound_cuts"] + sched["step_bound_over"]  # chunks cut, or steps past it
        assert (cuts > 0) == (ms > 0)
        # with the bound on, stage 0's measured steps calibrated the cost model (CPU steps are far
        # from the H100 fit's times); off, there is no calibration to report
        assert (sched.get("step_cost_observed", 0) > 0) == (ms > 0)
        assert ms == 0 or sched["step_cost_scale"] != 1.0
    assert out[2.0] == out[0.0]


def test_calibration_scales_the_fit_to_the_measured_steps():
    """observe(): measured steps at 0.4x the fit (with +-10% noise) bring the scale to 0.4, and
    ms() and fit_tokens() follow: 64 decodes the fit puts over a 30 ms bound (no room for prefill)
    leave room once calibrated. One stalled step moves the scale by at most 1.32x (the clamp's fifth
    root), and a later run of true steps brings it back."""
    rng = random.Random(1)
    cost = StepCost(48, 128, 8)
    ctx = 64 * 1100
    assert cost.ms(64, ctx) > 30 and cost.fit_tokens(64, ctx, 0, 4096, 30.0) == 0
    for _ in range(60):
        tokens = rng.randrange(1, 600)
        pairs = tokens * rng.randrange(100, 3000)
        cost.observe(0.4 * cost.modeled_ms(tokens, pairs) * rng.uniform(0.9, 1.1), tokens, pairs)
    assert cost.scale == pytest.approx(0.4, rel=0.06) and cost.observed == 60
    assert cost.ms(64, ctx) == pytest.approx(cost.scale * cost.modeled_ms(64, ctx))
    room = cost.fit_tokens(64, ctx, 0, 4096, 30.0)
    assert room > 0 and cost.ms(64 + room, ctx + chunk_pairs(room, 0)) <= 30.0
    before = cost.scale
    cost.observe(1000 * cost.modeled_ms(16, 16 * 1000), 16, 16 * 1000)  # a step behind a host stall
    assert before < cost.scale <= before * 4 ** 0.2 * (1 + 1e-9)
    for _ in range(40):
        cost.observe(0.4 * cost.modeled_ms(32, 32 * 900), 32, 32 * 900)
    assert cost.scale == pytest.approx(0.4, rel=1e-3)
    cost.observe(0.0, 8, 800)  # nothing measured and no tokens: ignored
    cost.observe(5.0, 0, 0)
    assert cost.observed == 101


def test_stage_share_and_the_first_step():
    """The first measured step sets the scale outright (the fit's card is not this one); a stage
    holding a quarter of the layers is compared with a quarter of the modeled time."""
    cost = StepCost(48, 128, 8)
    cost.observe(0.25 * 3 * cost.modeled_ms(100, 100 * 500), 100, 100 * 500, share=0.25)
    assert cost.scale == pytest.approx(3.0)


def test_stage_timer_reports_measured_steps_with_their_pairs():
    """StageTimer.on_step sees each completed step stop() was given pairs for (the CPU clock
    resolves at once), with its time and sizes; steps without pairs (the sampler's) are not seen."""
    import time

    from engine.runtime.clock import StageTimer
    timer, seen = StageTimer("cpu"), []
    timer.on_step = lambda ms, tokens, pairs: seen.append((ms, tokens, pairs))
    t = timer.start()
    time.sleep(0.02)
    timer.stop(t, 7, 123.0)
    timer.stop(timer.start(), 3)
    assert len(seen) == 1 and seen[0][1:] == (7, 123.0) and 15 <= seen[0][0] <= 1000
    assert timer.collect(reset=False)["steps"] == 2


def test_graph_replays_do_not_calibrate_the_step_cost(monkeypatch):
    """StageWorker.forward gives the step-cost calibration its eager steps (prefill and mixed, the
    steps max_step_ms bounds) and not its decode graph replays, which skip the launch cost the fit
    holds: a replayed 64-decode step measured at 0.4x the fit would pull the scale of the mixed
    steps down with it."""
    from types import SimpleNamespace

    from engine.runtime import stage_worker
    from engine.runtime.clock import StageTimer
    w = stage_worker.StageWorker.__new__(stage_worker.StageWorker)
    w.rank, w.num_stages, w.device = 0, 1, "cpu"
    w.timer, seen = StageTimer("cpu"), []
    w.timer.on_step = lambda ms, tokens, pairs: seen.append((tokens, pairs))
    w.tracer = SimpleNamespace(gpu_start=lambda: None)
    replays = []
    w.graphs = SimpleNamespace(fits=lambda view: view.decode_only,
                               run=lambda x, view, copy: replays.append(view.T) or x)
    w.stage = lambda x, batch: x
    monkeypatch.setattr(stage_worker, "eager_batch", lambda view, device: None)
    decode = SimpleNamespace(decode_only=True, T=64, causal_pairs=lambda: 64 * 1100.0)
    mixed = SimpleNamespace(decode_only=False, T=1088, causal_pairs=lambda: 64 * 1100.0 + 1024 * 1025 / 2)
    for view in (decode, mixed, decode):
        w.forward(torch.zeros(view.T), view)
    assert replays == [64, 64] and seen == [(1088, 64 * 1100.0 + 1024 * 1025 / 2)]
    assert w.timer.collect(reset=False)["steps"] == 3  # every step still counts as busy time
