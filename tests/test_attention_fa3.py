"""model/attention_prefill_fa3.py (TMA / warp-specialised / split-KV paged prefill) against the fp32
torch reference of test_attention_kernels (same NaN-poisoned pools and tolerances).

Without CUDA the kernel runs under TRITON_INTERPRET=1 (descriptor loads included; warp
specialisation is a no-op there) on small shapes; @pytest.mark.gpu cases run the real shape
(32 q / 4 kv heads, head_dim 128, bf16) at offsets up to 100k on sm_90.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

import test_attention_kernels as tak  # sets TRITON_INTERPRET on CPU before triton is imported

from model import attention_prefill_fa3 as f3  # noqa: E402
from model.batch import AttnBatch  # noqa: E402

if not tak._CUDA and not f3._interpreted():
    f3 = importlib.reload(f3)

_HOPPER = tak._CUDA and torch.cuda.get_device_capability()[0] == 9


def run_fa3(qlens, ctxs, N, K, D, S, dtype, num_splits=None, want_tma=None, seed=None, q_mul=1.0, **cfg):
    """q_mul scales q (and so every score) before the run and the reference."""
    q, kc, vc, bt, qs, cl = tak.make_case(qlens, ctxs, N, K, D, S, dtype, seed=seed)
    if q_mul != 1.0:
        q = (q.float() * q_mul).to(dtype)
    out = tak.nan_like(q)
    block_n = cfg.get("BLOCK_N", f3.TILES_TMA["BLOCK_N"])
    if want_tma is not None:
        assert f3.tma_ok(q, kc, vc, block_n) == want_tma
    max_prefix = max(c - ql for ql, c in zip(qlens, ctxs))
    o = f3.paged_prefill_fa3(q, kc, vc, bt, qs, cl, D ** -0.5, max(qlens), max_prefix, out=out,
                             config=cfg or None, num_splits=num_splits)
    assert o is out
    ref = tak.ref_fp32(q, kc, vc, bt, qlens, ctxs, D ** -0.5)
    return tak.check(o, ref, dtype, f"fa3 N{N} K{K} D{D} S{S} {dtype} splits={num_splits} {cfg} "
                                    f"q{qlens[:6]} ctx{ctxs[:6]}")


# ----------------------------------------------------------------------------- small (CPU or GPU)

SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("N,K,S,qlens,ctxs", [
    (4, 4, 16, [37, 5], [37, 77]),              # G=1: fresh (offset 0) + chunk mid-block
    (8, 2, 32, [20, 9, 1], [340, 29, 50]),      # G=4: deep-ish, several tiles; a single-query row
    (16, 1, 64, [3, 12], [200, 75]),            # G=16 (BLOCK_M grows to 16 rows of one query)
    (6, 2, 256, [33], [600]),                   # G=3 (padded rows), one 256-token block
])
def test_fa3_tma_small(N, K, S, qlens, ctxs, splits, lazy):
    """Tiles inside one block (S >= BLOCK_N): K/V through tensor descriptors; exact or lazy rescale."""
    run_fa3(qlens, ctxs, N, K, 16, S, torch.bfloat16, num_splits=splits, want_tma=True, LAZY=lazy, **SMALL)


def tile_maxima(q_mul, qlen, ctx, N, K, D, S, bn, qm, seed):
    """For make_case(seed)'s single sequence with q scaled by q_mul, per (query, head) row: the
    largest jump of a key tile's max score (log2 units) over the running max of the tiles before it,
    over the tiles unmasked for the row's program whatever its first query (keys below
    (pos - qm + 2) // bn * bn), from tile 0 on as one split walks them; and the spread (largest
    minus smallest tile max) over every tile the row sees whole. A jump > LAZY_TAU makes LAZY's
    rescale branch fire (one split); a spread <= LAZY_TAU keeps it from firing after a split's first
    tile (any split)."""
    q, kc, _, bt, _, _ = tak.make_case([qlen], [ctx], N, K, D, S, torch.bfloat16, seed=seed)
    q = (q.float() * q_mul).to(torch.bfloat16).float().cpu()
    n = ctx // bn * bn
    k = tak.gather_kv(kc.cpu(), bt[0].cpu(), ctx)[:n].float().repeat_interleave(N // K, 1)  # [n, N, D]
    s = torch.einsum("tnd,knd->tnk", q, k) * D ** -0.5 * f3._LOG2E
    tm = s.view(qlen, N, n // bn, bn).amax(-1)  # [qlen, N, tiles]
    pos = torch.arange(ctx - qlen, ctx)[:, None, None]
    j = torch.arange(n // bn)
    prev = torch.cat([torch.full_like(tm[..., :1], float("-inf")), tm.cummax(-1).values[..., :-1]], -1)
    jump = torch.where((j >= 1) & (j < (pos - qm + 2).div(bn, rounding_mode="floor")), tm - prev, -1e9)
    seen = j < (pos + 1).div(bn, rounding_mode="floor")
    spread = torch.where(seen, tm, -1e9).amax(-1) - torch.where(seen, tm, 1e9).amin(-1)
    return jump.max().item(), spread[(seen.sum(-1) >= 2).expand_as(spread)].max().item()


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("q_mul,fires", [(12.0, True), (1.0, False)])  # peaked / flat scores
@pytest.mark.parametrize("qlen,ctx", [(64, 64), (23, 400)])  # fresh (offset 0); offset 377 mid-block
def test_fa3_lazy_rescale(qlen, ctx, q_mul, fires, splits):
    """LAZY: stale max while no row's tile max jumps past it by more than LAZY_TAU. Peaked scores
    (q x12) make the rescale branch fire between unmasked tiles, so it must rescale acc and l
    alike; flat ones never move the max after a split's first tile. Both against the reference."""
    N, K, D, S, seed = 8, 2, 16, 32, 1234
    qm = SMALL["BLOCK_M"] // (N // K)  # queries per program
    jump, spread = tile_maxima(q_mul, qlen, ctx, N, K, D, S, SMALL["BLOCK_N"], qm, seed)
    tau = f3.LAZY_TAU.value
    assert (jump > tau) if fires else (spread <= tau), (jump, spread)
    run_fa3([qlen], [ctx], N, K, D, S, torch.bfloat16, num_splits=splits, want_tma=True, seed=seed,
            q_mul=q_mul, LAZY=True, **SMALL)


@pytest.mark.parametrize("splits", [1, 2])
def test_fa3_gather_small(splits):
    """Block size 8 < BLOCK_N: the tile's rows are gathered through the table."""
    run_fa3([21, 1, 40], [90, 7, 40], 4, 2, 16, 8, torch.bfloat16, num_splits=splits, want_tma=False,
            **SMALL)


def test_fa3_fp32_and_more_splits_than_tiles():
    """fp32 (IEEE dots); 5 splits over 2 unmasked key tiles: empty splits weigh nothing."""
    run_fa3([9], [41], 4, 2, 32, 16, torch.float32, num_splits=5, **SMALL)


def test_fa3_through_prefill_attend():
    """The engine path on sm_90 (hopper=True): chunks here, single-query rows by the decode kernel."""
    prefill_attend = tak.prefill_attend  # bound to the kernels as (re)loaded for this process
    qlens, ctxs = [1, 30, 1], [33, 500, 9]
    q, kc, vc, bt, _, _ = tak.make_case(qlens, ctxs, 8, 2, 16, 16, torch.bfloat16)
    batch = AttnBatch.build(qlens, ctxs, [bt[b].tolist() for b in range(3)], 16, [True] * 3, tak.DEV)
    batch.block_tables = bt
    o = prefill_attend(q, kc, vc, batch, 0.25, hopper=True)
    ref = tak.ref_fp32(q, kc, vc, bt, qlens, ctxs, 0.25)
    tak.check(o, ref, torch.bfloat16, "prefill_attend hopper")


def test_choose_kv_splits():
    sms = 132
    assert f3.choose_kv_splits(132, 90_000, sms) == 1  # a full grid is not split
    assert f3.choose_kv_splits(400, 90_000, sms) == 1
    assert f3.choose_kv_splits(56, f3.MIN_SPLIT_KEYS - 1, sms) == 1  # too few keys to share
    assert f3.choose_kv_splits(56, 3 * f3.MIN_SPLIT_KEYS, sms) <= 3
    s = f3.choose_kv_splits(56, 90_000, sms)  # issue 22's second turn: 14 query tiles x 4 kv heads
    assert 1 < s <= f3.MAX_SPLITS
    waves = [-(-56 * t // sms) / t for t in range(1, f3.MAX_SPLITS + 1)]
    assert waves[s - 1] == min(waves) and waves[s - 1] < waves[0] / 2


def test_tma_ok_on_the_engine_pool_views():
    """A layer's K and V of the stage's [layers, 2, P, S, K, D] pool read by TMA when a key tile
    fits in a block; a view with heads not packed per row, or a smaller block, does not."""
    q = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    for S, ok in ((64, True), (128, True), (16, False)):
        kv = torch.zeros(3, 2, 5, S, 4, 128, dtype=torch.bfloat16)
        assert f3.tma_ok(q, kv[1, 0], kv[1, 1], 64) == ok
    kv = torch.zeros(3, 5, 2, 128, 4, 128, dtype=torch.bfloat16)  # [layers, P, 2, S, K, D]: pages apart
    assert not f3.tma_ok(q, kv[1, :, 0], kv[1, :, 1], 64)


def test_engine_default_block_holds_a_tma_tile():
    """The engine's default pool takes the TMA path: a block holds a whole key tile (at 16-token
    blocks Hopper's long chunks fell back to the FA2-style kernel)."""
    from engine.options import EngineOptions
    S = EngineOptions().block_size
    q = torch.zeros(8, 32, 128, dtype=torch.bfloat16)
    kc = torch.zeros(4, S, 4, 128, dtype=torch.bfloat16)
    assert f3.tma_ok(q, kc, kc, f3.TILES_TMA["BLOCK_N"])


def test_fa3_rejects_bad_head_dim():
    q = torch.zeros(4, 4, 24, dtype=torch.bfloat16, device=tak.DEV)
    kc = torch.zeros(2, 16, 2, 24, dtype=torch.bfloat16, device=tak.DEV)
    i32 = dict(dtype=torch.int32, device=tak.DEV)
    with pytest.raises(ValueError, match="head_dim 24"):
        f3.paged_prefill_fa3(q, kc, kc, torch.zeros(1, 1, **i32), torch.tensor([0, 4], **i32),
                             torch.tensor([4], **i32), 0.1, 4)


# ----------------------------------------------------------------------------- real shapes (H200)

gpu_hopper = pytest.mark.skipif(not _HOPPER, reason="needs an sm_90 GPU")


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("qlen,ctx,S,splits", [
    (4096, 4096, 128, None),          # fresh chunk, offset 0
    (1000, 1000 + 4104, 128, None),   # mid-block offset
    (4096, 100_000 + 4096, 128, None),  # deep: TMA, grid full
    (216, 100_000 + 216, 128, None),  # deep short chunk: split-KV
    (216, 100_000 + 216, 128, 1),     # ... and not split
    (216, 100_000 + 216, 16, None),   # block 16: gathered tiles, split-KV
    (2048, 100_000 + 2048, 16, None),  # block 16, deep
])
def test_gpu_fa3_real_shape(qlen, ctx, S, splits):
    run_fa3([qlen], [ctx], 32, 4, 128, S, torch.bfloat16, num_splits=splits,
            want_tma=True if S >= 128 else None)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("q_mul", [1.0, 12.0])  # flat / peaked scores (the rescale branch fires)
@pytest.mark.parametrize("qlen,ctx,splits", [
    (4096, 32768 + 4096, None),  # 4k chunk at 32k: grid full, not split
    (216, 32768 + 216, None),    # short chunk: split-KV (partials keep the stale max)
])
def test_gpu_fa3_lazy_real_shape(qlen, ctx, splits, q_mul):
    """LAZY at the engine's shape and block size 64 (TMA tiles) against the reference."""
    run_fa3([qlen], [ctx], 32, 4, 128, 64, torch.bfloat16, num_splits=splits, want_tma=True, q_mul=q_mul,
            LAZY=True)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("N,K,S", [(32, 32, 16), (64, 4, 256), (16, 16, 64), (48, 8, 128)])
def test_gpu_fa3_groups_and_blocks(N, K, S):
    """GQA groups 1, 16, 1, 6; block sizes 16..256 (TMA where S >= BLOCK_N)."""
    cfg = dict(BLOCK_N=64) if S == 64 else {}
    run_fa3([300, 1, 700], [300, 5000, 9000], N, K, 128, S, torch.bfloat16, **cfg)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("n,warps,stages", [(128, 8, 2), (64, 4, 3)])
@pytest.mark.parametrize("splits", [1, 4])
def test_gpu_fa3_warp_specialized(n, warps, stages, splits):
    run_fa3([4096], [40_000], 32, 4, 128, 128, torch.bfloat16, num_splits=splits, want_tma=True,
            BLOCK_M=128, BLOCK_N=n, num_warps=warps, num_stages=stages, WS=True)


def test_warm_shapes_compile_the_split_variants():
    """On a modeled H200 (132 SMs, 32 q / 4 kv heads), the warm-up runs a chunk batch that splits
    the KV with and without decode rows beside it, and one that does not split."""
    from model.warmup import warm_shapes
    seen = set()
    for qlens, ctxs in warm_shapes(8192, 64, 131072, small_max=8):
        chunks = [(q, c) for q, c in zip(qlens, ctxs) if q > 1]
        if not chunks:
            continue
        programs = -(-max(q for q, _ in chunks) // (f3.TILES_TMA["BLOCK_M"] // 8)) * 4 * len(qlens)
        split = f3.choose_kv_splits(programs, max(c - q for q, c in chunks), 132) > 1
        seen.add((split, len(chunks) < len(qlens)))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
