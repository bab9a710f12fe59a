"""Prefix cache in the block manager and scheduler (no model): block keys chained to the parent and
salted, ref counts, LRU eviction, reset, when blocks become cacheable, and a soak of 1,000 requests
from a few shared prefixes against a fake pipeline whose tokens depend on the KV it reads back
(tests/fake_kv.py), with preemptions, evictions, aborts and continuations."""
import hashlib
import random

import pytest

from engine.runtime.block_manager import BlockManager, block_hash, root_hash
from engine.params import SamplingParams
from engine.runtime.scheduler import Scheduler, cache_salts
from engine.runtime.sequence import Sequence
from fake_kv import check_pool, drive, reference


def seq(i, prompt, max_tokens=4, salt=None, stop=()):
    return Sequence(i, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), stop, salt)


def sched(num_blocks=64, bs=4, budget=64, caching=True, stages=1, max_seqs=8, max_len=1000):
    return Scheduler(BlockManager(num_blocks, bs, caching), max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                     max_model_len=max_len, num_stages=stages)


def finish(s, mb, tok=5):
    return s.complete(mb, [tok] * len(mb.sampled))


# ---- keys --------------------------------------------------------------------------------------

def test_block_keys_chain_the_parent_and_the_salt():
    a, b = list(range(4)), list(range(4, 8))
    root = root_hash(None)
    assert block_hash(root, a) == block_hash(root, list(a))
    assert block_hash(root, a) != block_hash(root, b)
    assert block_hash(block_hash(root, a), b) != block_hash(block_hash(root, b), b)  # same tokens, other parent
    assert len({root_hash(None), root_hash("t1"), root_hash("t2")}) == 3
    assert block_hash(root, [1, 2]) != block_hash(root, [2, 1]) != block_hash(root, [1 << 40, 2])
    # keys of a sequence: block i's key is its parent's key and its own ids, nothing else
    bm = BlockManager(8, 4)
    s = seq(0, a + a + a + [9])
    keys = bm.hashes(s, 3)
    want = hashlib.sha256(root_hash(None) + b"".join(t.to_bytes(8, "little") for t in a)).digest()
    assert keys[0] == want and len(set(keys)) == 3  # a block repeated at another depth is another key
    assert bm.hashes(seq(1, a + a + a, salt="x"), 3)[0] != keys[0]



def naive_keys(ids: list[int], bs: int, num_blocks: int, salt=None) -> list[bytes]:
    keys, parent = [], root_hash(salt)
    for i in range(num_blocks):
        parent = block_hash(parent, ids[i * bs:(i + 1) * bs])
        keys.append(parent)
    return keys


@pytest.mark.parametrize("bs", [1, 3, 16])
def test_keys_in_batches_match_the_chain_of_block_hash(bs):
    """hashes() converts a run of blocks at once: the same keys as block_hash block by block, for
    any split of the calls, as the sequence grows (a partial last block gets no key until full)."""
    rng = random.Random(bs)
    for trial in range(20):
        ids = [rng.randrange(1 << rng.choice([8, 17, 40])) for _ in range(rng.randrange(1, 20 * bs))]
        salt = rng.choice([None, "t"])
        s, bm = seq(trial, ids[:rng.randrange(1, len(ids) + 1)], salt=salt), BlockManager(8, bs)
        while True:
            full = len(s) // bs
            got = bm.hashes(s, rng.randrange(len(s.block_hashes), full + 1))
            assert got == naive_keys(s.token_ids, bs, len(got), salt)
            if len(s) == len(ids):
                break
            s.token_ids += ids[len(s):len(s) + rng.randrange(1, 2 * bs)]
        assert bm.hashes(s, len(s) // bs) == naive_keys(ids, bs, len(ids) // bs, salt)


def test_lookup_matches_a_walk_over_every_key():
    """lookup() hashes in doubling batches up to the first miss: the same hits as walking every
    key, with cached prefixes ending on each side of the batch edges (16, 48, 112 blocks), the
    last block never offered, and caching off or prompt logprobs asked: none."""
    rng = random.Random(0)
    bs, prefix = 2, [rng.randrange(512) for _ in range(500)]
    for cached in [0, 1, 15, 16, 17, 47, 48, 49, 111, 112, 113, 199, 200]:
        bm = BlockManager(300, bs)
        writer = seq(0, prefix)
        assert bm.admit(writer, [], len(prefix))
        bm.commit(writer, cached * bs)
        for tail in [0, 1, 3]:  # tokens past the cached prefix: the last block holds the last token
            for salt in [None, "x"]:
                s = seq(1, prefix[:rng.randrange(cached * bs, 500) + 1] + [7] * tail, salt=salt)
                limit = (len(s) - 1) // bs
                want = []
                for key in naive_keys(s.token_ids, bs, limit, salt):
                    if key not in bm.cached:
                        break
                    want.append(bm.cached[key])
                assert bm.lookup(s) == want and len(want) <= min(cached, limit)
                assert salt is not None or len(want) == min(cached, limit)
    assert BlockManager(256, bs, enable_caching=False).lookup(seq(2, prefix)) == []
    logprobs = Sequence(3, prefix, SamplingParams(max_tokens=1, prompt_logprobs=1), (), None)
    assert bm.lookup(logprobs) == []


def test_cache_salts_validation():
    assert cache_salts(None, 2) == [None, None] and cache_salts("t", 2) == ["t", "t"]
    assert cache_salts(["a", None], 2) == ["a", None]
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        cache_salts("", 1)
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        cache_salts(3, 1)
    with pytest.raises(ValueError, match="2 cache_salt values for 3 prompts"):
        cache_salts(["a", "b"], 3)


# ---- block manager -----------------------------------------------------------------------------

def test_lookup_shares_refcounted_blocks_and_release_keeps_them_cached():
    bm = BlockManager(8, 4)
    a = seq(0, range(10))
    assert bm.lookup(a) == [] and bm.admit(a, [], 10) and bm.num_free == 5
    bm.commit(a, 10)  # blocks 0, 1 full; block 2 holds 2 of 4 tokens: not cached
    assert len(bm.cached) == 2 and a.num_committed_blocks == 2
    b = seq(1, list(range(10)) + [77])
    hits = bm.lookup(b)
    assert hits == a.block_table[:2]
    assert bm.admit(b, hits, 11) and [bm.ref[x] for x in hits] == [2, 2] and bm.num_free == 4
    bm.release(a)
    assert [bm.ref[x] for x in hits] == [1, 1] and bm.num_free == 5 and bm.num_cached_idle == 0
    bm.release(b)
    assert bm.num_free == 8 and bm.num_cached_idle == 2
    check_pool(bm)
    c = seq(2, list(range(8)) + [1, 2, 3])  # the cached prefix, then other tokens
    assert bm.lookup(c) == hits
    assert bm.admit(c, hits, 11) and bm.num_cached_idle == 0 and bm.num_free == 5  # idle hits left the queue
    assert not bm.admit(seq(3, range(40)), [], 40) and bm.num_free == 5  # too few: nothing taken


def test_a_whole_cached_prompt_still_computes_its_last_token():
    s = sched(bs=4)
    a = seq(0, range(8), max_tokens=1)
    s.add(a)
    finish(s, s.schedule())
    b = seq(1, range(8), max_tokens=1)
    s.add(b)
    mb = s.schedule()
    (c,) = mb.chunks
    assert (c.start, c.length, c.sample) == (4, 4, True)  # block 1 is cached too, but holds the last token
    assert b.num_cached_tokens == 4 and s.snapshot()["prefix_cache_hits"] == 4
    finish(s, mb)
    s2 = sched(bs=4)
    s2.add(seq(0, range(9), max_tokens=1))
    finish(s2, s2.schedule())
    s2.add(seq(1, range(9), max_tokens=1))
    (c,) = s2.schedule().chunks
    assert (c.start, c.length) == (8, 1)  # 8 of 9 found: one token computed


def test_lru_eviction_takes_plain_blocks_then_least_recently_released_tail_first():
    bm = BlockManager(8, 2)
    x, y = seq(0, [1, 2, 3, 4, 5]), seq(1, [9, 8, 7, 6, 5])
    for s in (x, y):
        assert bm.admit(s, [], 5)
        bm.commit(s, 5)
    xb, yb = list(x.block_table), list(y.block_table)
    bm.release(x)  # first released: evicted first, its tail (block 1) before its head (block 0)
    bm.release(y)
    assert list(bm.free)[:4] == [x for x in bm.free if bm.key[x] is None]  # plain blocks first
    z = seq(2, range(100, 110))
    assert bm.admit(z, [], 10)  # 5 blocks: 4 plain + x's block 1
    assert bm.num_evicted == 1 and bm.key[xb[1]] is None and bm.key[xb[0]] is not None
    assert bm.lookup(seq(3, [1, 2, 3, 4, 5])) == [xb[0]] and bm.lookup(seq(4, [9, 8, 7, 6, 5])) == yb[:2]
    w = seq(5, range(200, 204))
    assert bm.admit(w, [], 4)  # 2 blocks: x's head, then y's tail
    assert bm.lookup(seq(3, [1, 2, 3, 4, 5])) == [] and bm.lookup(seq(4, [9, 8, 7, 6, 5])) == yb[:1]


def test_reset_drops_idle_cached_blocks_and_keeps_those_in_use():
    bm = BlockManager(8, 2)
    a, b = seq(0, [1, 2, 3, 4, 5]), seq(1, [6, 7, 8, 9, 1])
    for s in (a, b):
        bm.admit(s, [], 5)
        bm.commit(s, 5)
    bm.release(a)
    assert bm.reset_cache() is False  # b's blocks are in use and stay cached
    assert bm.lookup(seq(2, [1, 2, 3, 4, 5])) == [] and len(bm.lookup(seq(3, [6, 7, 8, 9, 1]))) == 2
    bm.release(b)
    assert bm.num_cached_idle == 2 and bm.reset_cache() is True and bm.num_cached_idle == 0
    check_pool(bm)
    assert bm.num_free == 8 and not bm.cached


def test_disabled_cache_finds_nothing():
    s = sched(caching=False)
    for i in range(2):
        s.add(seq(i, range(20), max_tokens=1))
        finish(s, s.schedule())
    snap = s.snapshot()
    assert snap["prefix_cache_hits"] == 0 and snap["cached_blocks"] == 0 and not s.blocks.cached


# ---- when a block becomes cacheable ------------------------------------------------------------

def test_a_new_prefix_arriving_twice_is_computed_once():
    """Two requests with one new prefix in one call: a chunk never reads another chunk's writes of
    the same micro-batch, so the second follows the first one micro-batch later and starts after
    its blocks; a third added beside the follower finds them too, while the first two are still in
    flight. With the cache off both compute it in one micro-batch."""
    s = sched(bs=4, budget=64)
    a, b = seq(0, range(12)), seq(1, range(12))
    s.add(a)
    s.add(b)
    m1 = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in m1.chunks] == [(0, 0, 12)]
    assert list(s.waiting) == [b] and not b.block_table
    assert len(s.blocks.cached) == 3 and all(s.blocks.key[x] for x in a.block_table)
    c = seq(2, list(range(12)) + [40])
    s.add(c)
    m2 = s.schedule()
    # b's last block holds its last token (computed, for its logits); c's whole 12 are cached
    assert [(ch.seq.seq_id, ch.start, ch.length) for ch in m2.chunks] == [(1, 8, 4), (2, 12, 1)]
    assert b.block_table[:2] == a.block_table[:2] and c.block_table[:3] == a.block_table
    assert s.snapshot()["prefix_cache_hits"] == 8 + 12
    finish(s, m1)
    finish(s, m2)
    assert all(x.finish_reason is None for x in (a, b, c))

    s = sched(bs=4, budget=64, caching=False)
    a, b = seq(0, range(12)), seq(1, range(12))
    s.add(a)
    s.add(b)
    m1 = s.schedule()
    assert [(c.start, c.length) for c in m1.chunks] == [(0, 12), (0, 12)]
    assert set(a.block_table).isdisjoint(b.block_table)


def test_followers_see_the_blocks_of_every_prefill_admitted_before_them():
    """One call admits several prompts: a follower waits for a block of any prefill admitted ahead
    of it in the same call, whether that prefill came before or after the first follower check
    (a 3-token prompt has no block a later lookup could offer: no check)."""
    s = sched(bs=4, budget=64)
    short, p1, q1, p2, q2, r = (seq(0, [90, 91, 92]), seq(1, range(12)), seq(2, range(50, 60)),
                                seq(3, list(range(12)) + [7]), seq(4, range(50, 61)), seq(5, range(70, 79)))
    for x in (short, p1, q1, p2, q2, r):
        s.add(x)
    m1 = s.schedule()
    assert [c.seq.seq_id for c in m1.chunks] == [0, 1, 2, 5] and list(s.waiting) == [p2, q2]
    m2 = s.schedule()
    assert [(c.seq.seq_id, c.start) for c in m2.chunks] == [(3, 12), (4, 8)]
    assert p2.block_table[:3] == p1.block_table and q2.block_table[:2] == q1.block_table[:2]


def test_a_follower_trails_a_chunked_prefill_and_others_pass_it():
    """A request whose next block a running prefill writes in this micro-batch waits (keeping its
    place) until it is cached; a request behind it with another prompt is admitted meanwhile."""
    s = sched(bs=4, budget=16)
    a = seq(0, range(20))
    s.add(a)
    m1 = s.schedule()  # a: tokens 0..15, blocks 0..3 cached at the end of the call
    b, other = seq(1, list(range(20)) + [7, 8]), seq(2, range(100, 106))
    s.add(b)
    s.add(other)
    m2 = s.schedule()  # a: 16..19 writes block 4, b's next block: b waits, other goes
    assert [(c.seq.seq_id, c.start, c.length) for c in m2.chunks] == [(0, 16, 4), (2, 0, 6)]
    assert list(s.waiting) == [b]
    m3 = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in m3.chunks] == [(1, 20, 2)]
    assert b.block_table[:5] == a.block_table
    for mb in (m1, m2, m3):
        finish(s, mb)
    assert s.snapshot()["prefix_cache_hits"] == 20


def test_a_follower_goes_on_alone_when_the_writer_is_aborted():
    """The writer asks for prompt_logprobs, so its prefill runs PROMPT_LOGPROB_ROWS tokens a
    micro-batch and the budget has room for the follower, which waits. The writer is aborted: the
    follower starts after the blocks it did write (they stay cached) and computes the rest itself,
    and finishes; nothing waits forever."""
    from engine.runtime.scheduler import PROMPT_LOGPROB_ROWS as R
    s = sched(num_blocks=4 * R // 4, bs=4, budget=4 * R, max_len=4 * R)
    prompt = list(range(3 * R))
    a = Sequence(0, prompt, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0), (), None)
    b = seq(1, prompt + [7, 8])
    s.add(a)
    s.add(b)
    m1 = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in m1.chunks] == [(0, 0, R)] and list(s.waiting) == [b]
    m2 = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in m2.chunks] == [(0, R, R)] and list(s.waiting) == [b]
    s.abort(0)
    finish(s, m1)
    finish(s, m2)
    m3 = s.schedule()  # a wrote blocks for 2R tokens before its abort
    assert [(c.seq.seq_id, c.start, c.length) for c in m3.chunks] == [(1, 2 * R, R + 2)]
    finish(s, m3)
    while s.has_work:
        finish(s, s.schedule())
    assert b.finish_reason == "length" and s.blocks.num_free == s.blocks.num_blocks


def test_mid_prefill_only_written_full_blocks_are_cached():
    s = sched(bs=4, budget=6)
    a = seq(0, range(20))
    s.add(a)
    s.schedule()  # tokens 0..5: block 0 full, block 1 half
    assert a.num_committed_blocks == 1 and len(s.blocks.cached) == 1
    s.schedule()  # tokens 6..11
    assert a.num_committed_blocks == 3
    b = seq(1, range(30))
    s.add(b)
    mb = s.schedule()
    assert [(c.seq.seq_id, c.start) for c in mb.chunks] == [(0, 12)]  # the budget went to a
    mb = s.schedule()  # a's last 2 tokens complete its block 4, b's next: b follows
    assert [(c.seq.seq_id, c.start, c.length) for c in mb.chunks] == [(0, 18, 2)]
    mb = s.schedule()  # b starts after a's blocks 0..4, all written
    assert [(c.seq.seq_id, c.start, c.length) for c in mb.chunks] == [(1, 20, 6)]


def test_a_block_completed_by_a_continuation_is_cached_when_its_token_arrives():
    s = sched(bs=4)
    a = seq(0, range(7), max_tokens=5)
    s.add(a)
    m1 = s.schedule()  # prompt: 7 tokens, samples token 7
    m2 = s.schedule_continuation()  # writes token 7 (not known on the host yet): block 1 full
    assert a.num_committed_blocks == 1 and len(s.blocks.cached) == 1
    s.complete(m1, [50])
    assert a.num_committed_blocks == 2 and s.blocks.key[a.block_table[1]] is not None
    b = seq(1, list(range(7)) + [50, 3])
    s.add(b)
    m3 = s.schedule()
    assert [(c.seq.seq_id, c.start) for c in m3.chunks] == [(1, 8)]
    s.complete(m2, [51])
    s.complete(m3, [52])


def test_different_salts_never_share_blocks():
    s = sched(bs=4)
    for i, salt in enumerate(["t1", "t2", None, "t1"]):
        s.add(seq(i, range(13), max_tokens=1, salt=salt))
        finish(s, s.schedule())
    assert s.snapshot()["prefix_cache_hits"] == 12  # only the second "t1" request found its prefix
    assert len(s.blocks.cached) == 9


# ---- soak against the fake pipeline ------------------------------------------------------------

def _workload(rng: random.Random, n: int, bs: int):
    """n requests from a few shared prefixes: block-sized pieces reused at other depths (so a key
    that ignored the parent would hand out wrong blocks), prefixes that end inside a block and on
    a block boundary, tails of 0.., two salts, and follow-up turns (an earlier prompt + answer)."""
    pieces = [[rng.randrange(53) for _ in range(bs)] for _ in range(3)]
    prefixes = [pieces[0] + pieces[1] + pieces[2], pieces[2] + pieces[0] + pieces[1][:3],
                pieces[1] + pieces[1] + pieces[1] + pieces[0], pieces[0][:5]]
    reqs = []
    for i in range(n):
        pre = rng.choice(prefixes)
        tail = [rng.randrange(53) for _ in range(rng.choice([0, 0, 1, 3, 9, 17]))]
        salt = rng.choice([None, None, "tenant-b"])
        reqs.append((pre + tail or [1], rng.randint(1, 10), rng.randrange(53) if rng.random() < 0.5 else None, salt))
    return reqs


@pytest.mark.parametrize("stages,use_async", [(1, False), (2, True), (4, True)])
def test_soak_of_1000_requests_from_shared_prefixes_matches_the_uncached_reference(stages, use_async):
    rng = random.Random(22 + stages)
    bs, blocks = 4, 40
    reqs = _workload(rng, 1000, bs)
    s = sched(num_blocks=blocks, bs=bs, budget=24, stages=stages, max_seqs=6, max_len=80)
    pending = list(enumerate(reqs))
    aborted: set[int] = set()
    seen: set[int] = set()

    def on_step(step, outputs):
        for i in sorted(outputs.keys() - seen):  # a follow-up turn: the prompt, its answer, a question
            seen.add(i)
            prompt, mt, stop, salt = reqs[i]
            turn = prompt + outputs[i][0] + [rng.randrange(53) for _ in range(rng.randint(1, 6))]
            if rng.random() < 0.3 and len(turn) + mt <= 80:
                reqs.append((turn, mt, stop, salt))
                pending.append((len(reqs) - 1, reqs[-1]))
        while pending and len(s.waiting) + len(s.running) < 10:  # requests arrive as others finish
            i, (prompt, mt, stop, salt) = pending.pop(0)
            s.add(Sequence(i, prompt, SamplingParams(max_tokens=mt, temperature=0), (stop,) if stop is not None else (),
                           salt))
        if step % 7 == 0 and s.seqs:
            victim = rng.choice(sorted(s.seqs))
            if s.abort(victim):
                aborted.add(victim)

    on_step(0, {})
    out = drive(s, max(stages, 2) if use_async else stages, use_async, on_step)
    snap = s.snapshot()
    check_pool(s.blocks)
    assert not s.has_work and len(out) + len(aborted) == len(reqs) > 1100 and len(aborted) >= 50
    for i, (got, reason) in out.items():
        prompt, mt, stop, _ = reqs[i]
        assert got == reference(prompt, mt, stop), f"request {i}"
        assert reason == ("stop" if got[-1] == stop else "length")
    # the cache did its work: most prompt tokens found, blocks evicted, sequences preempted
    assert snap["prefix_cache_hits"] > snap["prefix_cache_queries"] // 3, snap
    assert snap["prefix_cache_evictions"] > 0 and snap["preemptions"] > 0, snap
    assert (snap["continuations"] > 0) == use_async
