"""A fake pipeline for scheduler tests of the prefix cache: it runs each micro-batch when it is
dispatched, writing into a KV pool of the scheduler's block ids a value that depends on the whole
prefix (as real KV does), and samples from the values it reads back through the block table. A
block handed out with the wrong contents (another prefix, not yet written, overwritten) changes the
tokens, which `reference` computes from the token ids alone. Chunks of one micro-batch do not see
each other's writes (the conservative reading of an attention backend)."""
from __future__ import annotations

import collections

V = 53  # vocabulary: small, so stop tokens come up
_M = (1 << 61) - 1


def mix(h: int, x: int) -> int:
    return ((h ^ (x + 0x9E3779B97F4A7C15)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % _M


def kv_value(prev: int, token: int, pos: int) -> int:
    return mix(mix(prev, token), pos)


def sample(values: list) -> int:
    h = 7
    for v in values:
        h = mix(h, -1 if v is None else v)
    return h % V


def reference(prompt: list[int], max_tokens: int, stop: int | None) -> list[int]:
    """The tokens the fake model gives a prompt, from the token ids alone (greedy)."""
    toks, vals, out = list(prompt), [], []
    while True:
        while len(vals) < len(toks):
            vals.append(kv_value(vals[-1] if vals else 0, toks[len(vals)], len(vals)))
        t = sample(vals)
        out.append(t)
        toks.append(t)
        if t == stop or len(out) >= max_tokens:
            return out


class FakePipeline:
    def __init__(self, blocks):
        self.blocks, self.bs = blocks, blocks.block_size
        self.pool = [[None] * self.bs for _ in range(blocks.num_blocks)]
        self.results: dict[int, dict[int, int]] = {}  # micro-batch id -> {seq id: sampled token}

    def _read(self, table: list[int], pos: int):
        return self.pool[table[pos // self.bs]][pos % self.bs]

    def run(self, mb) -> list[int]:
        """Execute mb now (at dispatch); returns its sampled tokens, in the order of mb.sampled."""
        writes, out = [], {}
        for c in mb.chunks:
            assert c.length >= 1, "a chunk without tokens has no logits to sample"
            table = c.seq.block_table
            prev = self._read(table, c.start - 1) if c.start else 0
            own = []
            for j in range(c.length):
                pos = c.start + j
                tok = self.results[c.source_mb][c.seq.seq_id] if c.pending else c.seq.token_ids[pos]
                prev = kv_value(-1 if prev is None else prev, tok, pos)
                own.append(prev)
                b = table[pos // self.bs]
                assert self.blocks.ref[b] == 1, f"sequence {c.seq.seq_id} writes into block {b}, held by others"
                writes.append((b, pos % self.bs, prev))
            if c.sample:
                out[c.seq.seq_id] = sample([self._read(table, p) for p in range(c.start)] + own)
        for b, o, v in writes:
            self.pool[b][o] = v
        self.results[mb.mb_id] = out
        return [out[s.seq_id] for s in mb.sampled]


def drive(sched, in_flight: int, use_async: bool, on_step=None) -> dict[int, tuple[list[int], str]]:
    """Run the scheduler as PipelineEngine.step does (each micro-batch dispatched as soon as it is
    scheduled, `in_flight` at most, completed in order). on_step(step, outputs) runs after each
    completion (aborts, new requests). Returns {seq id: (output ids, finish reason)} of finished
    sequences."""
    fake = FakePipeline(sched.blocks)
    q, outputs, step = collections.deque(), {}, 0
    while sched.has_work or q:
        while len(q) < in_flight:
            mb = sched.schedule() or (sched.schedule_continuation() if use_async else None)
            if mb is None:
                break
            q.append((mb, fake.run(mb)))
        if not q:
            raise AssertionError("work left but nothing schedulable")
        mb, toks = q.popleft()
        del fake.results[mb.mb_id]  # a later continuation feeds only from micro-batches in flight
        for s in sched.complete(mb, toks):
            if s.finish_reason is not None:
                outputs[s.seq_id] = (list(s.output_ids), s.finish_reason)
        step += 1
        if on_step is not None:
            on_step(step, outputs)
    return outputs


def check_pool(bm) -> None:
    """Nothing held: every block free (plain or cached-idle), refs zero, the key map consistent."""
    assert all(r == 0 for r in bm.ref), "a block is still referenced"
    assert len(bm.free) == bm.num_blocks
    keyed = [b for b in range(bm.num_blocks) if bm.key[b] is not None]
    assert len(keyed) == len(bm.cached) == bm.num_cached_idle
    assert all(bm.cached[bm.key[b]] == b for b in keyed)
    plain = sum(1 for b in bm.free if bm.key[b] is None)
    assert plain + bm.num_cached_idle == bm.num_blocks
