"""The logic of the decode CUDA graphs, on CPU: which batch sizes are captured, which one a step
replays, and how the graph's padding rows are filled (engine/runtime/decode_graphs.py, fill_batch)."""
from __future__ import annotations

import torch

from engine.runtime.decode_graphs import BUCKETS, bucket_for, graph_buckets
from engine.runtime.step_plan import BatchBuffers, PlanView, decode_plan, fill_batch


def test_buckets_end_at_max_batch_and_a_step_takes_the_smallest_that_holds_it():
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(1) == [1]
    assert graph_buckets(1000) == list(BUCKETS)  # past the last bucket decodes run eager
    for max_batch in (1, 5, 8, 100, 256, 1000):
        buckets = graph_buckets(max_batch)
        for n in range(1, buckets[-1] + 1):
            b = bucket_for(buckets, n)
            assert b >= n and all(c < n for c in buckets if c < b), (max_batch, n, b)


def test_fill_batch_pads_graph_rows_into_the_scratch_block():
    """3 decoding sequences in a bucket of 8: the plan's rows are copied, and the 5 padding rows
    each get one token at position 0 whose k/v land in the scratch slot, reading only the
    scratch block (so they touch no sequence's blocks)."""
    bs, scratch, cap, M = 16, 9, 8, 4
    ctxs, tables = [5, 17, 40], [[3], [4, 6], [0, 1, 2]]
    header, plan = decode_plan(ctxs, tables, bs)
    view = PlanView(header.tolist(), torch.from_numpy(plan))
    i32, i64 = torch.int32, torch.int64
    buf = BatchBuffers(torch.full((cap,), -7, dtype=i64), torch.full((cap,), -7, dtype=i64),
                       torch.arange(cap + 1, dtype=i32), torch.full((cap,), -7, dtype=i32),
                       torch.full((cap, M), -7, dtype=i32), torch.arange(cap, dtype=i64))
    fill_batch(view, buf, pad_slot=scratch * bs, pad_block=scratch)
    assert buf.positions[:3].tolist() == [c - 1 for c in ctxs]
    want_slots = [t[(c - 1) // bs] * bs + (c - 1) % bs for c, t in zip(ctxs, tables)]
    assert buf.slots[:3].tolist() == want_slots
    assert buf.context_lens[:3].tolist() == ctxs
    assert buf.block_tables[2, :3].tolist() == [0, 1, 2] and buf.block_tables[1, :2].tolist() == [4, 6]
    assert buf.positions[3:].tolist() == [0] * 5
    assert buf.slots[3:].tolist() == [scratch * bs] * 5
    assert buf.context_lens[3:].tolist() == [1] * 5
    assert buf.block_tables[3:, 0].tolist() == [scratch] * 5


def test_every_decode_micro_batch_the_scheduler_builds_has_a_graph():
    """Up to max_num_seqs 512 (the engine captures graph_buckets(min(max_num_seqs, BUCKETS[-1])),
    engine/runtime/launch.py), every decode-only micro-batch the scheduler builds, on one or
    several stages and with continuations in flight, has a captured bucket; at 256 and 512 the
    largest bucket is the one full decode steps use."""
    from collections import deque

    from engine.params import SamplingParams
    from engine.runtime.block_manager import BlockManager
    from engine.runtime.scheduler import Scheduler
    from engine.runtime.sequence import Sequence
    for max_seqs in (3, 100, 256, 300, 512):
        for stages in (1, 2):
            s = Scheduler(BlockManager(8192, 16), max_num_seqs=max_seqs, max_num_batched_tokens=8192,
                          max_model_len=1000, num_stages=stages)
            for i in range(max_seqs + 7):
                s.add(Sequence(i, [3 + i % 50] * 9, SamplingParams(max_tokens=4, temperature=0), ()))
            sizes, flight = [], deque()
            while s.has_work or flight:
                while len(flight) < max(stages, 2):
                    mb = s.schedule() or s.schedule_continuation()
                    if mb is None:
                        break
                    flight.append(mb)
                    if all(c.length == 1 and c.start >= c.seq.prompt_len for c in mb.chunks):
                        sizes.append(len(mb.chunks))
                mb = flight.popleft()
                s.complete(mb, [7] * len(mb.sampled))
            top = graph_buckets(min(max_seqs, BUCKETS[-1]))[-1]
            assert sizes and max(sizes) <= top, (max_seqs, stages, max(sizes), top)
            if stages == 1 and max_seqs in (256, 512):
                assert max(sizes) == top == max_seqs
