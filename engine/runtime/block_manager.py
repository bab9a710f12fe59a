"""BlockManager: fixed-size KV blocks, ref-counted, with a prefix cache (no torch). Block ids are the
same on every stage (the same tokens, other layers): one manager on stage 0 serves the pipeline.

Prefix cache (vLLM v1's KVCacheManager/BlockPool, in small): a full block is keyed by
sha256(parent block's key, its token ids), the first block's parent being a root key derived from the
request's cache_salt, so a key names a whole prefix and different salts never meet. A block is
registered once the micro-batch writing its last token has been dispatched (Scheduler, "When a block
is cached"). Blocks nobody holds sit in the free queue, which is also the eviction order: blocks
without a key at its front (taken first), cached ones behind them, least recently released first."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence

_ROOT = b"moepipe-prefix-cache-v1"


def root_hash(cache_salt: str | None) -> bytes:
    """The parent key of a sequence's first block: one per salt (no salt is its own)."""
    salt = b"\x00" if cache_salt is None else b"\x01" + cache_salt.encode()
    return hashlib.sha256(_ROOT + salt).digest()


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The key of a full block: its parent's key (32 bytes) and its token ids (int64 each)."""
    return _chain(parent, array("q", token_ids).tobytes())


def _chain(parent: bytes, ids_int64) -> bytes:
    """sha256 of a parent key and a block's ids as int64 bytes (bytes or a memoryview slice)."""
    return hashlib.sha256(parent + ids_int64).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_caching = enable_caching
        self.ref = [0] * num_blocks  # sequences whose block table holds the block
        self.key: list[bytes | None] = [None] * num_blocks  # its prefix key while cached
        self.cached: dict[bytes, int] = {}  # prefix key -> the block holding it
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # ref 0; front = next taken
        self.num_cached_idle = 0  # cached blocks nobody holds (counted in num_free too)
        self.num_evicted = 0  # cached blocks taken for other tokens

    @property
    def num_free(self) -> int:
        """Blocks a sequence may take: free ones and cached ones nobody holds (evictable)."""
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- keys ----------------------------------------------------------------------------------
    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_hashes with at least the keys of its first num_blocks full blocks (each
        computed once: a sequence's tokens only grow). The new blocks' ids become int64 bytes in
        one conversion; each key (block_hash's _chain) then hashes its slice of them."""
        bs, h = self.block_size, seq.block_hashes
        first = len(h)
        if first >= num_blocks:
            return h
        raw = memoryview(array("q", seq.token_ids[first * bs:num_blocks * bs])).cast("B")
        width = 8 * bs  # bytes of a block's ids
        parent = h[-1] if h else root_hash(seq.cache_salt)
        for o in range(0, (num_blocks - first) * width, width):
            parent = _chain(parent, raw[o:o + width])
            h.append(parent)
        return h

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks of seq's longest cached prefix. At most len(seq) - 1 tokens: the last
        token is always computed (its logits give the next token), so a sequence never writes into
        a block it was handed from the cache. Keys are computed in batches that double up to the
        first miss: a fresh long prompt hashes a few blocks here, the rest as its chunks commit."""
        hits: list[int] = []
        limit = self._lookup_limit(seq)
        n = 0
        while n < limit:
            n = min(limit, max(16, 2 * n))
            for key in self.hashes(seq, n)[len(hits):n]:
                b = self.cached.get(key)
                if b is None:
                    return hits
                hits.append(b)
        return hits

    def next_key(self, seq: Sequence, num_hits: int) -> bytes | None:
        """The key of the block after seq's cached prefix of num_hits blocks (from lookup), when a
        later lookup could offer that block; None when it never could."""
        if num_hits >= self._lookup_limit(seq):
            return None
        return self.hashes(seq, num_hits + 1)[num_hits]

    def prompt_keys_to_write(self, seq: Sequence) -> list[bytes]:
        """The keys of seq's full prompt blocks not yet committed: what its prefill will cache."""
        full = seq.prompt_len // self.block_size
        if not self.enable_caching or seq.num_committed_blocks >= full:
            return []
        return self.hashes(seq, full)[seq.num_committed_blocks:full]

    def _lookup_limit(self, seq: Sequence) -> int:
        """How many leading full blocks lookup may offer seq: none without caching or with prompt
        logprobs (computed from each prompt position's logits: no skipping, as vLLM), else all but
        the block of its last token."""
        if not self.enable_caching or seq.params.prompt_logprobs is not None:
            return 0
        return (len(seq) - 1) // self.block_size

    # ---- taking and giving back ----------------------------------------------------------------
    def admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Give a sequence with no blocks the cached blocks `hits` (from lookup) and fresh ones up to
        num_tokens; False (and nothing taken) if the pool is short."""
        assert not seq.block_table, "admit takes a sequence without blocks"
        idle = sum(1 for b in hits if self.ref[b] == 0)
        if self.blocks_for(num_tokens) - len(hits) + idle > self.num_free:
            return False
        for b in hits:
            if self.ref[b] == 0:
                del self.free[b]
                self.num_cached_idle -= 1
            self.ref[b] += 1
        seq.block_table = list(hits)
        seq.num_committed_blocks = len(hits)
        return self.grow(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq enough blocks to hold num_tokens; False (and nothing taken) if there are too few."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(max(0, need)):
            b, _ = self.free.popitem(last=False)
            if self.key[b] is not None:  # evict the least recently released cached block
                del self.cached[self.key[b]]
                self.key[b] = None
                self.num_cached_idle -= 1
                self.num_evicted += 1
            self.ref[b] = 1
            seq.block_table.append(b)
        return True

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Cache seq's full blocks within its first num_tokens tokens, whose KV writes have all been
        dispatched. A key already cached (the same prefix computed beside it) keeps its block; seq's
        copy stays uncached."""
        if not self.enable_caching:
            return
        full = min(num_tokens, len(seq)) // self.block_size
        if full <= seq.num_committed_blocks:
            return
        keys = self.hashes(seq, full)
        for i in range(seq.num_committed_blocks, full):
            b = seq.block_table[i]
            if self.key[b] is None and keys[i] not in self.cached:
                self.key[b] = keys[i]
                self.cached[keys[i]] = b
        seq.num_committed_blocks = full

    def release(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks. Those nobody holds go to the free queue: uncached ones to
        its front, cached ones to its back, seq's last block first so that a prefix's tail is
        evicted before its head."""
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.key[b] is None:
                    self.free.move_to_end(b, last=False)
                else:
                    self.num_cached_idle += 1
        seq.block_table = []
        seq.num_committed_blocks = 0

    def reset_cache(self) -> bool:
        """Drop every cached block nobody holds (they become plain free blocks). True when nothing
        is cached any more; False when blocks in use keep their keys."""
        for b in list(self.free):
            if self.key[b] is not None:
                del self.cached[self.key[b]]
                self.key[b] = None
                self.free.move_to_end(b, last=False)
        self.num_cached_idle = 0
        return not self.cached
