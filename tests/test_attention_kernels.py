"""Triton paged attention (model/attention_triton.py, model/attention_prefill_triton.py) against the
torch reference (model/attention.py).

Without CUDA the kernels run under TRITON_INTERPRET=1 on small shapes (set here, before triton is
imported); with CUDA the same small cases run compiled, plus the @pytest.mark.gpu cases at the
real shapes. Skipped when triton is not installed.

Tolerances, relative Frobenius error ||o - ref|| / ||ref|| with ref computed in fp32 from the
same (upcast) inputs: fp32 inputs < 1e-4 (IEEE dots), bf16 inputs < 1e-2 (the kernels round P to
bf16 before P @ V and the output to bf16; the bf16 torch reference itself is ~4e-3 off).
Every call writes into a NaN-filled `out`; the cache's unused slots, the table's padding entries
and the spare blocks of the pool are NaN too, so a read outside a sequence's context, or a row
left unwritten, shows up as NaN.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import (and the kernels' jit)
pytest.importorskip("triton")

from model import attention_prefill_triton as fa  # noqa: E402
from model import attention_decode_merge as merge  # noqa: E402
from model import attention_triton as at  # noqa: E402
from model.attention import attention_ref, gather_kv  # noqa: E402
from model.batch import AttnBatch  # noqa: E402

if not _CUDA and not at._interpreted():  # imported earlier in this process without the env var
    merge = importlib.reload(merge)  # first: attention_triton binds its merge functions
    at = importlib.reload(at)
if not _CUDA and not fa._interpreted():
    fa = importlib.reload(fa)
from model import attention_paged  # noqa: E402  (after the reloads: it binds their kernels)
if not _CUDA:
    attention_paged = importlib.reload(attention_paged)
prefill_attend = attention_paged.prefill_attend

DEV = torch.device("cuda" if _CUDA else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------- helpers


def make_case(qlens: list[int], ctxs: list[int], N: int, K: int, D: int, S: int,
              dtype: torch.dtype, spare_blocks: int = 3, pad_cols: int = 2, seed: int | None = None):
    """Random q, a NaN-poisoned pool with shuffled block tables, and the metadata tensors."""
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"make_case seed={seed}")  # shown by pytest on failure: pass it back to reproduce
    g = torch.Generator().manual_seed(seed)
    nblk = [(c + S - 1) // S for c in ctxs]
    M = max(nblk) + pad_cols
    P = sum(nblk) + spare_blocks
    perm = torch.randperm(P, generator=g)
    k_cache = torch.full((P, S, K, D), float("nan"), dtype=dtype, device=DEV)
    v_cache = torch.full((P, S, K, D), float("nan"), dtype=dtype, device=DEV)
    spare = perm[sum(nblk):]
    tables = torch.empty(len(ctxs), M, dtype=torch.int32)
    used = 0
    for b, (n, c) in enumerate(zip(nblk, ctxs)):
        ids = perm[used:used + n]
        used += n
        tables[b, :n] = ids.to(torch.int32)
        pad = spare[torch.randint(len(spare), (M - n,), generator=g)] if len(spare) else ids[:1]
        tables[b, n:] = pad.to(torch.int32)  # NaN blocks: reading past the table's end shows
        for cache in (k_cache, v_cache):  # real values for the first c slots only
            vals = torch.randn(n * S, K, D, generator=g).to(dtype)
            vals[c:] = float("nan")
            cache[ids.to(DEV)] = vals.view(n, S, K, D).to(DEV)
    q = torch.randn(sum(qlens), N, D, generator=g).to(dtype).to(DEV)
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, tables.to(DEV), qs, torch.tensor(ctxs, dtype=torch.int32, device=DEV)


def ref_fp32(q, k_cache, v_cache, tables, qlens, ctxs, scale, chunk: int = 512) -> torch.Tensor:
    """attention_ref in fp32 (so its P cast is a no-op), one sequence and `chunk` queries at a time."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    N = q.shape[1]
    start = 0
    for b, (qlen, ctx) in enumerate(zip(qlens, ctxs)):
        K = k_cache.shape[2]
        k = gather_kv(k_cache, tables[b], ctx).float().transpose(0, 1).repeat_interleave(N // K, 0)
        v = gather_kv(v_cache, tables[b], ctx).float().transpose(0, 1).repeat_interleave(N // K, 0)
        for i in range(0, qlen, chunk):
            n = min(chunk, qlen - i)
            qq = q[start + i:start + i + n].float().transpose(0, 1)  # [N, n, D]
            s = torch.matmul(qq, k.transpose(1, 2)) * scale  # [N, n, ctx]
            qpos = torch.arange(ctx - qlen + i, ctx - qlen + i + n, device=q.device)[:, None]
            s.masked_fill_(torch.arange(ctx, device=q.device)[None, :] > qpos, float("-inf"))
            out[start + i:start + i + n] = torch.matmul(torch.softmax(s, -1), v).transpose(0, 1)
            del s
        start += qlen
    return out


def check(o: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    assert not torch.isnan(o).any(), f"{what}: NaN in output (row not written or bad read)"
    err = ((o.float() - ref).norm() / ref.norm()).item()
    print(f"{what}: rel err {err:.2e}")
    assert err < TOL[dtype], f"{what}: rel err {err:.2e} >= {TOL[dtype]:.0e}"
    return err


def nan_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def run_fa(qlens, ctxs, N, K, D, S, dtype, seed=None, **cfg):
    q, kc, vc, bt, qs, cl = make_case(qlens, ctxs, N, K, D, S, dtype, seed=seed)
    out = nan_like(q)
    o = fa.paged_prefill_fa(q, kc, vc, bt, qs, cl, D ** -0.5, max(qlens), out=out, config=cfg or None)
    assert o is out
    ref = ref_fp32(q, kc, vc, bt, qlens, ctxs, D ** -0.5)
    return check(o, ref, dtype, f"fa N{N} K{K} D{D} S{S} {dtype} {cfg} q{qlens[:6]} ctx{ctxs[:6]}")


def run_decode(ctxs, N, K, D, S, dtype, num_splits=None, block_n=None):
    q, kc, vc, bt, _, cl = make_case([1] * len(ctxs), ctxs, N, K, D, S, dtype)
    out = nan_like(q)
    o = at.paged_decode(q, kc, vc, bt, cl, D ** -0.5, max_context=max(ctxs), num_splits=num_splits,
                        out=out, block_n=block_n)
    assert o is out
    ref = ref_fp32(q, kc, vc, bt, [1] * len(ctxs), ctxs, D ** -0.5)
    return check(o, ref, dtype, f"decode N{N} K{K} D{D} S{S} {dtype} splits={num_splits} "
                                f"ctx{ctxs[:6]}")


# ----------------------------------------------------------------------------- small (CPU or GPU)


def test_ref_fp32_matches_attention_ref():
    """The chunked fp32 reference used below is attention_ref's maths (pure torch)."""
    qlens, ctxs = [3, 1, 20], [40, 9, 20]
    q, kc, vc, bt, _, _ = make_case(qlens, ctxs, 4, 2, 16, 8, torch.float32)
    a = attention_ref(q, kc, vc, bt, qlens, ctxs, 0.25)
    b = ref_fp32(q, kc, vc, bt, qlens, ctxs, 0.25, chunk=7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,D,S,qlens,ctxs", [
    (6, 1, 32, 16, [1, 37, 5, 1, 70], [50, 37, 100, 17, 140]),   # G=6, mixed, chunked prefill
    (4, 2, 16, 8, [33, 1, 9], [33, 3, 90]),                        # G=2, fresh + chunk mid-block
])
def test_prefill_small(N, K, D, S, qlens, ctxs, dtype):
    run_fa(qlens, ctxs, N, K, D, S, dtype)


def test_prefill_small_tiles_and_big_block():
    """Several query tiles and key tiles per sequence (BLOCK_M=16), block size 256."""
    run_fa([40, 3], [300, 260], 4, 2, 16, 256, torch.float32, BLOCK_M=16, BLOCK_N=32)
    run_fa([50, 1, 19], [77, 64, 19], 6, 1, 16, 8, torch.float32, BLOCK_M=16, BLOCK_N=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 1, 16])  # 16: most splits empty for short seqs
def test_decode_small(dtype, num_splits):
    run_decode([1, 17, 64, 200, 333, 600], 6, 1, 32, 16, dtype, num_splits)  # G=6


def test_decode_many_sequences():
    """DECODE_MANY_PAIRS (sequence, kv head) pairs of mixed short contexts: decode_launch's setting
    for them (64-key steps, two stages on GPU), one split, each program writing its output."""
    g = torch.Generator().manual_seed(3)
    ctxs = torch.randint(1, 150, (at.DECODE_MANY_PAIRS // 4,), generator=g).tolist()
    assert at.decode_launch(len(ctxs), 4)[0] == 64
    run_decode(ctxs, 8, 4, 16, 16, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_with_no_keys_writes_zeros(num_splits):
    """A sequence without keys (context 0) gets zeros, whether one program writes its output
    directly (one split) or the merge does (weights 0); its neighbours stay exact."""
    q, kc, vc, bt, _, cl = make_case([1, 1, 1], [40, 5, 130], 4, 2, 16, 8, torch.float32)
    cl[1] = 0
    o = at.paged_decode(q, kc, vc, bt, cl, 0.25, max_context=130, num_splits=num_splits, out=nan_like(q))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    keep = torch.tensor([0, 2])
    check(o[keep], ref_fp32(q[keep], kc, vc, bt[keep], [1, 1], [40, 130], 0.25), torch.float32, "no keys")


@pytest.mark.parametrize("splits", [32, 64])
def test_decode_merge_reads_only_filled_splits(monkeypatch, splits):
    """The engine's graphs fix the split count at the model's length (128 at batch 1), so short
    contexts leave most splits without a key; those programs write nothing. Poison every partial
    buffer with NaN: the result must still equal the reference (a merge that read an unfilled
    split would turn it into NaN). 32 splits of G = 2 merge in the split kernel, 64 in the merge
    kernel, which must skip the contexts within one 128-key slice (written by their program)."""
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(at.torch, "empty", poisoned)
    run_decode([1, 64, 65, 130, 7, 700], 4, 2, 16, 8, torch.float32, num_splits=splits)


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_both_key_steps(block_n, num_splits):
    """Both key steps decode_block_n picks, on contexts that end inside a 64- and a 128-key tile."""
    run_decode([1, 63, 64, 65, 129, 300], 4, 2, 16, 16, torch.float32, num_splits, block_n)


def test_decode_block_n_by_pairs():
    """64-key steps up to DECODE_SMALL_PAIRS (sequence, kv head) pairs, 128 past them, and 64 again,
    two stages deep, from DECODE_MANY_PAIRS."""
    assert at.decode_block_n(1, 4) == at.decode_block_n(2, 4) == 64
    assert at.decode_block_n(3, 4) == at.decode_block_n(16, 4) == at.DECODE_BLOCK_N == 128
    assert at.decode_launch(16, 4) == (128, 4, 3) and at.decode_launch(255, 4) == (128, 4, 3)
    assert at.decode_launch(256, 4) == at.decode_launch(512, 4) == (64, 4, 2)  # DECODE_MANY_PAIRS


def test_decode_group2_block8():
    run_decode([9, 130, 8], 4, 2, 16, 8, torch.float32, num_splits=3)


def test_decode_and_prefill_on_strided_views():
    """All-decode batch: decode == prefill; q a strided view of a qkv buffer, caches one layer of
    a bigger [L, 2, P, S, K, D] pool (the engine's layout may differ: only strides matter)."""
    N, K, D, S, ctxs = 8, 2, 16, 16, [5, 40, 77]
    q, kc, vc, bt, qs, cl = make_case([1] * 3, ctxs, N, K, D, S, torch.float32)
    pool = torch.randn(2, 2, *kc.shape, device=DEV)
    pool[1, 0], pool[1, 1] = kc, vc
    qkv = torch.randn(3, (N + 2 * K) * D, device=DEV)
    qkv[:, :N * D] = q.reshape(3, N * D)
    qv = qkv[:, :N * D].view(3, N, D)  # row stride (N + 2K) * D
    dec = at.paged_decode(qv, pool[1, 0], pool[1, 1], bt, cl, D ** -0.5, max(ctxs), out=nan_like(q))
    pre = fa.paged_prefill_fa(qv, pool[1, 0], pool[1, 1], bt, qs, cl, D ** -0.5, 1, out=nan_like(q))
    ref = ref_fp32(q, kc, vc, bt, [1] * 3, ctxs, D ** -0.5)
    check(dec, ref, torch.float32, "strided decode")
    check(pre, ref, torch.float32, "strided prefill")


class _Spy:
    """Stands in for a kernel: counts launches, runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("N,K", [(4, 2), (6, 1), (16, 2)])  # G = 2, 6 (tile 8), 8
def test_decode_fused_merge(monkeypatch, N, K):
    """Up to fused_merge_splits(G) splits, the split kernel's last program of each (sequence, kv
    head) merges: no merge launch, the result equal to the reference, and every arrival counter back
    at 0 for the next call. Two calls in a row with other contexts (other filled-split counts) and
    the counters seeded by the first: a counter left non-zero would make the wrong program merge."""
    G = N // K
    spy = _Spy(at._decode_merge_kernel)
    monkeypatch.setattr(at, "_decode_merge_kernel", spy)
    most = at.fused_merge_splits(G)
    assert most * triton_next_pow2(G) == 64 or most == 1
    for splits in sorted({2, 3, most}):
        for ctxs in ([1, 64, 130, 333, 40], [300, 2, 129, 17]):
            run_decode(ctxs, N, K, 16, 8, torch.float32, num_splits=splits, block_n=64)
            assert not at.arrivals(DEV, len(ctxs) * K)[:len(ctxs) * K].any(), "an arrival counter left set"
    assert spy.launches == 0
    run_decode([1, 64, 130, 333, 900], N, K, 16, 8, torch.float32, num_splits=2 * most, block_n=64)
    assert spy.launches == 1  # past the fused tile: the merge kernel


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_choose_num_splits():
    cpu = torch.device("cpu")  # assumes 132 SMs
    assert at.choose_num_splits(1, 4, 92160, cpu) == 128
    assert at.choose_num_splits(1, 4, 100, cpu) == 1
    assert at.choose_num_splits(16, 4, 131072, cpu) == 4  # 2 programs an SM past 8 (seq, head) pairs
    assert at.choose_num_splits(64, 4, 8192, cpu) == 1
    assert at.choose_num_splits(512, 4, 8192, cpu) == 1


# ----------------------------------------------------------------------------- paged flash prefill, small
# Offsets: fresh chunks (0), chunks starting inside a block, chunks many blocks deep, single
# queries. Tiles: S >= BLOCK_N (one block per K tile) and S < BLOCK_N (a tile spans blocks).


@pytest.mark.parametrize("N,K,D,S,qlens,ctxs,dtype,cfg", [
    (2, 2, 16, 16, [20, 1, 7], [20, 9, 40], torch.float32, dict(BLOCK_M=16, BLOCK_N=16)),   # G=1
    (8, 2, 32, 32, [24, 3], [120, 35], torch.float32, dict(BLOCK_M=32, BLOCK_N=16)),        # G=4
    (8, 1, 16, 16, [13, 5], [77, 5], torch.bfloat16, dict(BLOCK_M=32, BLOCK_N=32)),         # G=8
    (16, 1, 16, 256, [9, 2], [290, 258], torch.float32, dict(BLOCK_M=32, BLOCK_N=32)),      # G=16
    (12, 2, 24, 64, [13, 7], [70, 7], torch.float32, dict(BLOCK_M=32, BLOCK_N=16)),         # G=6, D pad
    (4, 2, 16, 1, [11], [45], torch.float32, dict(BLOCK_M=16, BLOCK_N=16)),                 # S=1
    (4, 2, 32, 128, [40, 1], [140, 100], torch.float32, {}),                                # defaults
    (8, 1, 16, 16, [40, 9], [150, 40], torch.float32, dict(BLOCK_M=256, BLOCK_N=64)),       # 32 queries/tile
])
def test_fa_prefill_small(N, K, D, S, qlens, ctxs, dtype, cfg):
    run_fa(qlens, ctxs, N, K, D, S, dtype, seed=sum(ctxs) + S, **cfg)


def test_fa_attend_mixed_batch():
    """The engine entry point on an AttnBatch: two chunks (one 3 blocks deep) and two decode rows,
    which go to the split-K decode kernel; equals attention_ref."""
    N, K, D, S = 8, 2, 16, 16
    qlens, ctxs = [1, 20, 1, 9], [50, 68, 7, 9]
    q, kc, vc, bt, _, _ = make_case(qlens, ctxs, N, K, D, S, torch.float32, seed=5)
    tables = [bt[b, :-(-c // S)].tolist() for b, c in enumerate(ctxs)]
    batch = AttnBatch.build(qlens, ctxs, tables, S, [True] * 4, DEV)
    got = prefill_attend(q, kc, vc, batch, D ** -0.5)
    check(got, ref_fp32(q, kc, vc, batch.block_tables, qlens, ctxs, D ** -0.5), torch.float32, "fa attend mixed")


def test_fa_tile_choice_counts_waves():
    """Bigger tiles (measured faster per row) unless they leave more of the last wave idle."""
    big, mid = fa.TILES_BIG["BLOCK_M"], fa.TILES_MID["BLOCK_M"]
    assert fa.choose_tiles(4096, 8, 4, 1, 132)["BLOCK_M"] == big  # 512 programs: 4 full-ish waves
    assert fa.choose_tiles(3520, 8, 4, 1, 132)["BLOCK_M"] == mid  # 440 = 3.3 waves vs 880 = 6.7
    assert fa.choose_tiles(1024, 6, 8, 1, 132)["BLOCK_M"] == mid
    assert fa.choose_tiles(8192, 16, 4, 2, 132)["BLOCK_M"] == big


def test_fa_rejects_bad_input():
    q, kc, vc, bt, qs, cl = make_case([4], [4], 4, 3, 16, 16, torch.float32, seed=0)  # 4 heads, 3 kv heads
    with pytest.raises(ValueError, match="not a multiple"):
        fa.paged_prefill_fa(q, kc, vc, bt, qs, cl, 0.25, 4)
    q, kc, vc, bt, qs, cl = make_case([4], [4], 4, 2, 16, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="dtypes differ"):
        fa.paged_prefill_fa(q.to(torch.bfloat16), kc, vc, bt, qs, cl, 0.25, 4)


# ----------------------------------------------------------------------------- real shapes (GPU)

BF16 = torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_gpu_decode_90k():
    run_decode([92160], 32, 4, 128, 16, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_gpu_decode_b16_mixed():
    ctxs = [1, 7, 16, 17, 100, 513, 1024, 2000, 3001, 4096, 5000, 6100, 7000, 7777, 8191, 8192]
    run_decode(ctxs, 32, 4, 128, 16, BF16)
    run_decode(ctxs, 32, 4, 128, 16, BF16, num_splits=1)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("B,splits", [(16, None), (8, 8), (4, 2)])
def test_gpu_decode_fused_merge_races(B, splits):
    """The fused merge with programs really racing: equal contexts (every split finishes at about
    the same time), 200 launches in a row, each bitwise equal to the first (the merge's order does
    not depend on which program arrives last) and to the reference; a program that merged before
    the others' partials were visible would differ in some launch."""
    ctxs = [3000] * B
    q, kc, vc, bt, _, cl = make_case([1] * B, ctxs, 32, 4, 128, 64, BF16)
    kw = dict(max_context=max(ctxs), num_splits=splits)
    first = at.paged_decode(q, kc, vc, bt, cl, 128 ** -0.5, **kw)
    used = splits or at.choose_num_splits(B, 4, max(ctxs), DEV)
    assert 1 < used <= at.fused_merge_splits(8)
    check(first, ref_fp32(q, kc, vc, bt, [1] * B, ctxs, 128 ** -0.5), BF16, f"fused merge B{B}")
    outs = [at.paged_decode(q, kc, vc, bt, cl, 128 ** -0.5, **kw) for _ in range(200)]
    bad = [i for i, o in enumerate(outs) if not torch.equal(o, first)]
    assert not bad, f"launches {bad[:10]} differ from the first"


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_gpu_decode_serving_batches():
    """256 sequences of mixed 1-1.5k contexts (decode_launch's 64-key steps two stages deep, one
    split written directly) and 40 of them (128-key steps, one split), block 64, at the 30b heads."""
    g = torch.Generator().manual_seed(1)
    ctxs = torch.randint(1, 1500, (256,), generator=g).tolist()
    assert at.decode_launch(256, 4) == (64, 4, 2)
    run_decode(ctxs, 32, 4, 128, 64, BF16)
    run_decode(ctxs[:40], 32, 4, 128, 64, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_gpu_prefill_fresh_8k():
    run_fa([8192], [8192], 32, 4, 128, 16, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_gpu_mixed_batch():
    run_fa([1, 1, 512, 1000, 1, 77], [3000, 17, 4000, 1000, 8192, 77], 32, 4, 128, 16, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,K,S", [(64, 4, 16), (48, 8, 16), (32, 4, 8), (32, 4, 64), (32, 4, 256)])
def test_gpu_other_shapes(N, K, S):
    run_decode([1, 300, 5000, 20000], N, K, 128, S, BF16)
    run_fa([1, 700, 2048], [4000, 700, 6000], N, K, 128, S, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_gpu_fp32():
    run_decode([1, 3000, 20000], 32, 4, 128, 16, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("qlen,ctx", [(4096, 92160), (4096, 4096), (4096, 36864 + 5)])
def test_gpu_fa_chunk(qlen, ctx):
    """4k chunks at 0, at 32k (+5: inside a block) and at 86k, GQA 32/4, block 16, bf16."""
    run_fa([qlen], [ctx], 32, 4, 128, 16, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,K,D,S", [(48, 8, 128, 16), (64, 4, 128, 16), (32, 4, 128, 64), (32, 4, 128, 256),
                                     (32, 32, 128, 32), (64, 4, 64, 16), (32, 2, 64, 128)])
def test_gpu_fa_shapes(N, K, D, S):
    """Group sizes 6, 16, 8, 1 (and 16 at D=64), block sizes 16..256, a mixed batch with decode rows."""
    run_fa([1, 700, 2048, 3], [4000, 700, 6000 + 3, 20000], N, K, D, S, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_gpu_fa_fp32():
    run_fa([1, 700, 1500], [4000, 700, 3000], 32, 4, 128, 16, torch.float32)


FA_CONFIGS = [(256, 64, 16, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4),
              (256, 64, 16, 2)]  # BLOCK_M, BLOCK_N, num_warps, num_stages


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m,n,w,st", FA_CONFIGS, ids=[f"M{m}-N{n}-w{w}-s{st}" for m, n, w, st in FA_CONFIGS])
def test_gpu_fa_configs(m, n, w, st):
    run_fa([333, 2048], [5000, 2048], 32, 4, 128, 16, BF16, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)


def test_decode_arrival_counters_outgrown_stay_alive():
    """A call with more (sequence, kv head) pairs than the counters hold gets a new zeroed buffer; the
    old one stays referenced (a CUDA graph captured before may still point at it), and later calls
    reuse the larger one."""
    first = merge.arrivals(DEV, 8)
    bigger = merge.arrivals(DEV, first.numel() + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    assert any(t is first for t in merge._outgrown)
    assert merge.arrivals(DEV, 8) is bigger
