"""Block manager and scheduler: admission, growth, chunked prefill, micro-batches in flight,
preemption and recompute, finish, refusal. Plain Python, no model."""
import pytest

from engine.runtime.block_manager import BlockManager
from engine.params import SamplingParams
from engine.runtime.scheduler import RequestRefused, Scheduler
from engine.runtime.sequence import Sequence, Status


def seq(i, n, max_tokens=4, stop=()):
    return Sequence(i, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, temperature=0), stop)


def run_to_end(s: Scheduler, token=7, limit=10_000):
    """Drive the scheduler as the engine does (one micro-batch in flight), return the schedule."""
    log = []
    while s.has_work and limit:
        mb = s.schedule()
        assert mb is not None, "work left but nothing schedulable"
        log.append([(c.seq.seq_id, c.start, c.length, c.sample) for c in mb.chunks])
        s.complete(mb, [token] * len(mb.sampled))
        limit -= 1
    return log


def test_block_manager_grow_and_release():
    bm = BlockManager(4, 8)
    a = seq(0, 3)
    assert bm.grow(a, 17) and len(a.block_table) == 3 and bm.num_free == 1
    assert not bm.grow(a, 40) and len(a.block_table) == 3  # nothing taken on failure
    assert bm.grow(a, 24) and len(a.block_table) == 3
    bm.release(a)
    assert bm.num_free == 4 and a.block_table == []


def test_chunked_prefill_under_token_budget_then_decode():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10, max_model_len=1000)
    a = seq(0, 25, max_tokens=3)
    s.add(a)
    log = run_to_end(s)
    assert log[:3] == [[(0, 0, 10, False)], [(0, 10, 10, False)], [(0, 20, 5, True)]]
    assert log[3:] == [[(0, 25, 1, True)], [(0, 26, 1, True)]]
    assert a.status == Status.FINISHED and a.finish_reason == "length" and a.output_ids == [7, 7, 7]
    assert s.blocks.num_free == 64


def test_decode_mixed_with_prefill_and_stop_token():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8, max_model_len=1000)
    a, b = seq(0, 3, max_tokens=5, stop=(7,)), seq(1, 12, max_tokens=2)
    s.add(a)
    s.add(b)
    mb = s.schedule()
    assert [(c.seq.seq_id, c.length) for c in mb.chunks] == [(0, 3), (1, 5)]
    s.complete(mb, [9])  # a samples 9; b's chunk did not sample
    mb = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in mb.chunks] == [(0, 3, 1), (1, 5, 7)]
    s.complete(mb, [7, 9])  # a hits its stop token
    assert a.finish_reason == "stop" and a.status == Status.FINISHED and a.block_table == []


def test_micro_batches_in_flight_split_decodes_and_pipeline_prefill_chunks():
    s = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=8, max_model_len=1000, num_stages=2)
    long = seq(0, 20)
    s.add(long)
    m1, m2 = s.schedule(), s.schedule()  # chunk k+1 scheduled while chunk k is in flight
    assert (m1.chunks[0].start, m2.chunks[0].start) == (0, 8) and not m1.chunks[0].sample
    m3 = s.schedule()
    assert m3.chunks[0].sample and m3.chunks[0].end == 20
    assert s.schedule() is None  # waiting for its sample
    for m in (m1, m2):
        s.complete(m, [])
    s.complete(m3, [5])
    # four decoding sequences spread over the two micro-batches in flight
    s2 = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=64, max_model_len=1000, num_stages=2)
    seqs = [seq(i, 3, max_tokens=10) for i in range(4)]
    for q in seqs:
        s2.add(q)
    s2.complete(s2.schedule(), [1] * 4)
    a, b = s2.schedule(), s2.schedule()
    assert len(a.chunks) == 2 and len(b.chunks) == 2
    assert {c.seq.seq_id for c in a.chunks}.isdisjoint({c.seq.seq_id for c in b.chunks})


@pytest.mark.parametrize("caching", [False, True])
def test_preempts_youngest_and_recomputes_it(caching):
    s = Scheduler(BlockManager(6, 4, enable_caching=caching), max_num_seqs=8, max_num_batched_tokens=64,
                  max_model_len=1000)
    old, young = seq(0, 8, max_tokens=8), seq(1, 8, max_tokens=8)
    s.add(old)
    s.add(young)
    log = run_to_end(s)
    assert young.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.output_ids == [7] * 8 and young.output_ids == [7] * 8
    assert s.blocks.num_free == 6
    if not caching:  # recomputed from token 0: prompt plus what it had generated
        recompute = [c for step in log for c in step if c[0] == 1 and c[1] == 0]
        assert len(recompute) >= 2 and max(c[2] for c in recompute) > 8
        return
    # with the cache it starts after old's first block (the same prompt, whose prefill it
    # follows), and resumes after the cached full blocks of its 13 tokens (old's, the same
    # tokens): 12 found, the 13th computed; nothing recomputed from token 0
    starts = [c[1] for step in log for c in step if c[0] == 1]
    assert starts == [4, 8, 9, 10, 11, 12, 13, 14]
    assert young.num_cached_tokens == 12 and s.snapshot()["prefix_cache_hits"] == 4 + 12


def test_refuses_requests_that_never_fit_and_others_go_on():
    s = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=100)
    s.add(seq(0, 5))
    with pytest.raises(RequestRefused, match="model's context of 100"):
        s.add(seq(1, 98, max_tokens=4))
    with pytest.raises(RequestRefused, match="whole KV cache of 32 tokens"):
        s.add(seq(2, 30, max_tokens=4))
    with pytest.raises(RequestRefused, match="empty prompt"):
        s.add(seq(3, 0))
    run_to_end(s)
    assert s.blocks.num_free == 8


def test_max_num_seqs_limits_admission():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=1000)
    for i in range(3):
        s.add(seq(i, 4))
    mb = s.schedule()
    assert [c.seq.seq_id for c in mb.chunks] == [0, 1] and len(s.waiting) == 1


def test_step_plan_matches_attn_batch_and_abort_frees_blocks():
    """The typed plan of a mixed micro-batch (prefill chunks and decodes) carries the metadata that
    AttnBatch.build computes from the same chunks, and its sampling rows; aborting a sequence
    while its micro-batch is in flight frees its blocks once that micro-batch completes."""
    import numpy as np
    import torch

    from engine.runtime.chunking import chunk_pairs
    from engine.runtime.step_plan import PlanView, build_plan, eager_batch
    from model.batch import AttnBatch
    from model.sampler import ROW

    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=12, max_model_len=1000)
    seqs = [seq(0, 3, max_tokens=5), seq(1, 9, max_tokens=5), seq(2, 30, max_tokens=5)]
    seqs[1].params = SamplingParams(max_tokens=5, temperature=0.7, top_k=3, top_p=0.8, min_p=0.1, seed=42)
    for q in seqs:
        s.add(q)
    for _ in range(3):  # decodes of 0 and 1 beside chunks of 2's prompt
        mb = s.schedule()
        header, plan = build_plan(0, mb.mb_id, mb.chunks, 4, engine_seed=5)
        view = PlanView(header.tolist(), torch.from_numpy(plan))
        got = eager_batch(view, "cpu")
        want = AttnBatch.build([c.length for c in mb.chunks], [c.end for c in mb.chunks],
                               [c.seq.block_table[:-(-c.end // 4)] for c in mb.chunks], 4,
                               [c.sample for c in mb.chunks], "cpu")
        for f in ("positions", "slot_mapping", "query_start", "context_lens_t", "logits_indices", "block_tables"):
            assert torch.equal(getattr(got, f).long(), getattr(want, f).long()), f
        assert (got.max_query_len, got.max_context) == (max(want.query_lens), max(want.context_lens))
        # stage 0 hands eager_batch its host plan: the host lengths are there from the start (read
        # from the device tensors they would cost a sync), equal to the chunks'
        hosted = eager_batch(PlanView(header.tolist(), torch.from_numpy(plan), host=plan), "cpu")
        assert got._query_lens is None and got._context_lens is None
        assert (hosted._query_lens, hosted._context_lens) == (want.query_lens, want.context_lens)
        assert (got.query_lens, got.context_lens) == (want.query_lens, want.context_lens)
        # a later rank has the lengths stage 0 sent on the host link (HopChannel.send_batch): the same
        sent = PlanView(header.tolist(), torch.from_numpy(plan), host=plan).host_lens().copy()
        later = PlanView(header.tolist(), torch.from_numpy(plan), lens=sent)
        assert (eager_batch(later, "cpu")._query_lens, eager_batch(later, "cpu")._context_lens) == \
            (want.query_lens, want.context_lens)
        assert later.causal_pairs() == sum(chunk_pairs(c.length, c.start) for c in mb.chunks)
        # the step's causal pairs (max_step_ms's calibration) from the host plan: each chunk's
        assert PlanView(header.tolist(), torch.from_numpy(plan), host=plan).causal_pairs() == \
            sum(chunk_pairs(c.length, c.start) for c in mb.chunks) and view.causal_pairs() is None
        ids = [t for c in mb.chunks for t in c.seq.token_ids[c.start:c.end]]
        assert view.part("ids").tolist() == ids
        rows = view.rows.numpy()
        assert rows.shape == (len(mb.sampled), ROW)
        for r, q in zip(rows, mb.sampled):
            p = q.params
            assert np.float32(r[0:1].view(np.float32)[0]) == np.float32(p.temperature) and r[1] == p.top_k
            assert r[6] == len(q.output_ids)
            if p.seed is not None:
                assert (int(r[4]) & 0xFFFFFFFF) | ((int(r[5]) & 0xFFFFFFFF) << 32) == p.seed
        if _ == 2:
            assert s.abort(2) and seqs[2].block_table  # in flight: blocks kept until it completes
        s.complete(mb, [7] * len(mb.sampled))
    assert seqs[2].block_table == [] and seqs[2].finish_reason == "abort"
    assert not s.abort(2)
    log = run_to_end(s)
    assert all(sid != 2 for step in log for sid, *_ in step)
    assert s.blocks.num_free == 64


# ---- async scheduling: continuations --------------------------------------------------------

def test_continuation_is_queued_before_its_token_and_feeds_from_the_sampling_micro_batch():
    """One decoding sequence: while its sample is in flight, its next step is scheduled with the
    pending token's position, the sampling micro-batch as source and the next step counter in its
    sampling row; a stop token arriving meanwhile drops the continuation's token and frees the pool."""
    import torch

    from engine.runtime.step_plan import H_FED, PlanView, build_plan

    s = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1000)
    a = seq(0, 5, max_tokens=10, stop=(3,))
    s.add(a)
    m1 = s.schedule()
    assert s.schedule() is None  # its first token is being sampled
    m2 = s.schedule_continuation()
    c = m2.chunks[0]
    assert (c.start, c.length, c.sample, c.pending, c.source_mb) == (5, 1, True, 1, m1.mb_id)
    assert s.schedule_continuation() is None  # one step ahead at most
    header, plan = build_plan(0, m2.mb_id, m2.chunks, 4, 0, fed=[0])
    view = PlanView(header.tolist(), torch.from_numpy(plan))
    assert view.header[H_FED] == 1 and view.part("ids").tolist() == [0]
    assert view.part("positions").tolist() == [5] and view.part("context_lens").tolist() == [6]
    assert view.rows[0, 6].item() == 1  # it samples output token 1 (token 0 is in flight)
    assert [q.seq_id for q in s.complete(m1, [9])] == [0] and a.output_ids == [9]
    m3 = s.schedule_continuation()
    assert (m3.chunks[0].start, m3.chunks[0].source_mb) == (6, m2.mb_id)
    assert s.complete(m2, [3]) and a.finish_reason == "stop" and s.blocks.num_free == 16
    assert s.complete(m3, [8]) == [] and a.output_ids == [9, 3]  # dropped: it had stopped
    assert s.snapshot()["dropped_tokens"] == 1 and s.snapshot()["continuations"] == 2
    assert not s.has_work and s.blocks.num_free == 16


def test_no_continuation_past_max_tokens():
    s = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=100)
    a, b = seq(0, 3, max_tokens=2), seq(1, 6, max_tokens=1)
    s.add(a)
    s.add(b)
    m1 = s.schedule()
    m2 = s.schedule_continuation()
    assert [c.seq.seq_id for c in m2.chunks] == [0]  # b's first token is its last
    s.complete(m1, [4, 4])
    assert b.finish_reason == "length" and b.output_ids == [4]
    assert s.schedule_continuation() is None  # a's second token is its last
    s.complete(m2, [5])
    assert a.finish_reason == "length" and a.output_ids == [4, 5] and s.blocks.num_free == 16


def _drive(s: Scheduler, in_flight: int, use_async: bool, rng, abort_at: dict[int, int]):
    """An engine with `in_flight` micro-batches in flight; a deterministic 'model' whose next token
    depends on the whole history, applied when a micro-batch completes (completions are in order,
    so a continuation's history then includes the token it was fed)."""
    import collections
    q = collections.deque()
    outputs, step = {}, 0
    while s.has_work or q:
        while len(q) < in_flight:
            mb = s.schedule() or (s.schedule_continuation() if use_async else None)
            if mb is None:
                break
            q.append(mb)
        mb = q.popleft()
        toks = []
        for c in mb.chunks:
            if c.sample:
                hist = c.seq.token_ids[:c.end]
                toks.append((sum(hist) * 31 + len(hist) * 7 + c.seq.seq_id) % 23)
        for q_ in s.complete(mb, toks):
            if q_.finish_reason is not None:
                outputs[q_.seq_id] = (list(q_.output_ids), q_.finish_reason)
        step += 1
        for sid in [k for k, v in abort_at.items() if v == step]:
            s.abort(sid)
    return outputs


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_async_scheduling_gives_the_same_tokens_under_preemption_and_abort(stages):
    """Random workloads with stop tokens, length limits, preemptions and aborts: the tokens and
    finish reasons with continuations equal those without, and the pool ends free."""
    import random
    for trial in range(6):
        results = []
        for use_async in (False, True):
            rng = random.Random(trial)
            s = Scheduler(BlockManager(14, 4), max_num_seqs=6, max_num_batched_tokens=9, max_model_len=40,
                          num_stages=stages)
            for i in range(10):
                s.add(seq(i, rng.randint(1, 12), max_tokens=rng.randint(1, 14), stop=(rng.randint(0, 22),)))
            aborts = {rng.randint(0, 9): rng.randint(3, 30) for _ in range(2)}
            out = _drive(s, max(stages, 2) if use_async else stages, use_async, rng, aborts)
            assert s.blocks.num_free == 14 and not s.has_work
            results.append((out, s.snapshot()))
        (sync, snap_sync), (asy, snap_async) = results
        done_both = sync.keys() & asy.keys()
        assert len(done_both) >= 6
        assert {k: sync[k] for k in done_both} == {k: asy[k] for k in done_both}, trial
        assert snap_sync["continuations"] == 0
    assert snap_async["continuations"] > 0


@pytest.mark.parametrize("n_seqs", [16, 5])
def test_continuations_keep_one_decode_group_per_stage(n_seqs):
    """2 stages, 2 micro-batches in flight, async scheduling: after the prefill the decodes run as
    two disjoint groups of at most ceil(n / 2) rows that take turns, so each stage can run one
    group while the other stage runs the other. (Uncapped, the first continuation took every
    decode, and from then on one micro-batch of n rows chained to the last: the stages alternated.)"""
    import collections
    s = Scheduler(BlockManager(64, 4), max_num_seqs=32, max_num_batched_tokens=256, max_model_len=100,
                  num_stages=2)
    for i in range(n_seqs):
        s.add(seq(i, 3, max_tokens=12))
    q, log = collections.deque(), []
    while s.has_work or q:
        while len(q) < 2:
            mb = s.schedule() or s.schedule_continuation()
            if mb is None:
                break
            q.append(mb)
            log.append(frozenset(c.seq.seq_id for c in mb.chunks))
        mb = q.popleft()
        s.complete(mb, [5] * len(mb.sampled))
    assert log[0] == frozenset(range(n_seqs))  # the prompts, in one micro-batch
    cap = -(-n_seqs // 2)
    decodes = log[1:]
    assert all(0 < len(g) <= cap for g in decodes), [len(g) for g in decodes]
    groups = set(decodes)
    assert len(groups) == 2 and not set.intersection(*map(set, groups))  # two disjoint groups...
    assert all(a != b for a, b in zip(decodes, decodes[1:]))  # ...taking turns
    assert s.blocks.num_free == 64 and not s.has_work


def test_prompt_logprobs_prefill_is_cut_to_the_rows_a_micro_batch_has():
    """A long prompt asking for prompt_logprobs takes at most PROMPT_LOGPROB_ROWS prompt tokens a
    micro-batch; a second such request waits in its place while a plain one behind it starts, and
    takes the rows left once the first is done with its prompt."""
    from engine.runtime.scheduler import PROMPT_LOGPROB_ROWS as R
    s = Scheduler(BlockManager(1024, 16), max_num_seqs=8, max_num_batched_tokens=8192, max_model_len=10_000)
    lp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    a = Sequence(0, list(range(1, 2 * R + 401)), lp, ())
    b = Sequence(1, list(range(5, R + 5)), lp, ())
    c = Sequence(2, list(range(3000, 3700)), SamplingParams(max_tokens=4, temperature=0), ())  # shares no block
    for q in (a, b, c):
        s.add(q)
    steps = []
    while s.has_work and len(steps) < 20:
        mb = s.schedule()
        steps.append([(ch.seq.seq_id, ch.start, ch.length) for ch in mb.chunks])
        s.complete(mb, [7] * len(mb.sampled))
    assert steps[:4] == [[(0, 0, R), (2, 0, 700)], [(0, R, R), (2, 700, 1)], [(0, 2 * R, 400), (2, 701, 1), (1, 0, R - 400)],
                         [(0, 2 * R + 400, 1), (2, 702, 1), (1, R - 400, 400)]]
    assert all(sum(n for i, st, n in mb if i in (0, 1) and st < (a.prompt_len if i == 0 else b.prompt_len)) <= R
               for mb in steps)
