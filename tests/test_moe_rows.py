"""The grouped expert GEMMs that find their experts' tokens themselves, every token a row of one
tile (model/moe_rows_triton.py), against the aligned grouped GEMMs (model/fused_moe_triton.
grouped_gemms, pointer loads): the same bits at the same tiles, since a row's result does not depend
on where the align puts it; and the whole MoE against the torch reference (model/moe.
experts_grouped). Experts of uneven size: some taking every token, experts nobody chose, top-k not
a power of two. Without
CUDA they run under TRITON_INTERPRET=1 at small shapes; @pytest.mark.gpu cases use the real shapes."""
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import test_fused_moe as tfm  # noqa: E402  (sets TRITON_INTERPRET on CPU and reloads the kernel modules)
from model.moe import experts_grouped, route  # noqa: E402

fm, ma, mr, md = tfm.fm, tfm.ma, tfm.mr, tfm.md
DEV = "cuda" if _CUDA else "cpu"


def _case(N, H, I, E, k, seed, dtype=torch.bfloat16, crowd=0):
    """x, w13, w2, routing (w, ids): the reference's routing of random tokens; the first `crowd`
    tokens all choose experts 0..k-1, so those experts hold several row tiles."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.02).to(DEV, dtype)
    w2 = (torch.randn(E, H, I, generator=g) * 0.02).to(DEV, dtype)
    gate = (torch.randn(E, H, generator=g) * 0.02).to(DEV, dtype)
    x = torch.randn(N, H, generator=g).to(DEV, dtype)
    _, w, ids = route(x, gate, k, True)
    ids[:crowd] = torch.arange(k, device=DEV)
    return x, w13, w2, w, ids


def _aligned(x, w13, w2, w, ids, tiles):
    pairs, bexp = ma.align_by_expert(ids, w13.shape[0], tiles[0])
    return fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, tma=False)


def _close(got, want, bound=2 ** -7):
    """Each element within bound of its row's largest magnitude (rows of zeros: equal)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = (got.float() - want.float()).abs()
    scale = want.float().abs().amax(dim=-1, keepdim=True)
    assert (diff <= bound * scale).all(), f"max error {(diff / scale.clamp_min(1e-30)).max():.4f} of the row's scale"


@pytest.mark.parametrize("N,shape,crowd,tiles", [
    (5, (96, 32, 16, 4), 0, (16, 32, 32, 4, 1)),    # 20 pairs, most experts one or two rows
    (16, (96, 32, 16, 4), 16, (16, 32, 32, 4, 1)),  # experts 0..3 take every token: a full tile
    (7, (48, 40, 6, 3), 3, (16, 64, 64, 4, 1)),     # top-3 of 6, I = 40 not a multiple of BK or BN
    (24, (64, 32, 8, 2), 0, (32, 16, 32, 4, 1)),    # a 32-row tile, N tile narrower than I
])
def test_token_rows_give_the_aligned_bits(N, shape, crowd, tiles):
    H, I, E, k = shape
    x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N + E, crowd=crowd)
    got = mr.rows_gemms(x, w13, w2, ids, w, tiles)
    assert torch.equal(got, _aligned(x, w13, w2, w, ids, tiles))
    _close(fm.combine_k(got.view(N, k, H)), experts_grouped(x, w13, w2, ids, w))


@pytest.mark.parametrize("N,shape,crowd,tiles", [
    (40, (96, 32, 16, 4), 40, (16, 32, 32, 4, 1)),  # experts 0..3 take all 40 tokens: 3 row tiles each
    (24, (96, 32, 16, 4), 6, (16, 32, 32, 4, 1)),   # most experts one tile, 0..3 two
    (7, (48, 40, 6, 3), 0, (16, 64, 64, 4, 1)),     # top-3 of 6, I = 40
])
def test_ranked_rows_give_the_aligned_bits(N, shape, crowd, tiles):
    """The ranked form (each program ranks its expert's pairs into BM-row tiles, looping past the
    first): the aligned GEMMs' bits, the whole MoE within the bound of the torch path."""
    H, I, E, k = shape
    x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N + 100, crowd=crowd)
    got = mr.rows_gemms(x, w13, w2, ids, w, tiles, ranked=True)
    assert torch.equal(got, _aligned(x, w13, w2, w, ids, tiles))
    _close(fm.combine_k(got.view(N, k, H)), experts_grouped(x, w13, w2, ids, w))


def test_unchosen_experts_write_nothing_and_every_pair_is_written():
    """Experts 0 and 1 take all 12 tokens (every other expert's programs find no token and exit):
    every pair's row of y is the reference's, none left as the buffer's initial bytes."""
    H, I, E, k = 64, 32, 8, 2
    x, w13, w2, w, ids = _case(12, H, I, E, k, seed=5, crowd=12)
    assert set(ids.unique().tolist()) == {0, 1}
    for ranked in (False, True):
        got = mr.experts_rows(x, w13, w2, ids, w, tiles=(16, 32, 32, 4, 1), ranked=ranked)
        assert torch.isfinite(got).all()
        _close(got, experts_grouped(x, w13, w2, ids, w))


def test_fused_experts_takes_the_token_rows_between_the_thresholds(monkeypatch):
    """fused_experts: the GEMV path up to small_max_pairs, the token-row form up to rows_max_pairs
    while one tile holds the batch (MAX_ROWS tokens), then the ranked form up to ranked_max_pairs,
    the aligned grouped path above (or with both 0); each against the reference."""
    taken = []
    for name in ("experts_small", "experts_large", "experts_rows"):
        real = getattr(md, name)
        monkeypatch.setattr(md, name, lambda *a, _r=real, _n=name, **kw: taken.append(
            _n + (" ranked" if kw.get("ranked") else "")) or _r(*a, **kw))
    H, I, E, k = 96, 32, 16, 4
    rows = mr.MAX_ROWS
    for N, rows_max, ranked_max, want_path in (
            (2, 512, 512, "experts_small"), (6, 512, 0, "experts_rows"), (9, 32, 0, "experts_large"),
            (6, 0, 0, "experts_large"), (rows, 512, 0, "experts_rows"), (rows + 1, 512, 0, "experts_large"),
            (rows + 1, 512, 512, "experts_rows ranked"), (9, 32, 64, "experts_rows ranked"),
            (rows + 1, 512, 64, "experts_large")):
        x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N)
        got = md.fused_experts(x, w13, w2, ids, w, small_max_pairs=8, rows_max_pairs=rows_max,
                               ranked_max_pairs=ranked_max)
        assert taken[-1] == want_path, (N, rows_max, ranked_max)
        _close(got, experts_grouped(x, w13, w2, ids, w))


def test_row_tiles_hold_the_batch():
    assert mr.rows_tiles(9, 128, 8) == fm.grouped_tiles(72, 128) and mr.rows_tiles(9, 128, 8)[0] == 16
    assert mr.rows_tiles(24, 128, 8)[0] == 32  # a wider tile where a caller passes more tokens
    assert mr.rows_fit(16, 8, 512) and not mr.rows_fit(17, 8, 512) and not mr.rows_fit(16, 16, 250)
    assert not mr.rows_fit(9, 8, 0) and not mr.rows_fit(0, 8, 512)
    assert mr.ranked_fit(64, 8, 128, 512) and not mr.ranked_fit(65, 8, 128, 512) and not mr.ranked_fit(24, 8, 128, 0)
    # 16 experts at 500 pairs: 31 rows an expert, a 32-row tile x 512 ids = 16 384 > MAX_MATCH
    assert fm.grouped_tiles(500, 16)[0] == 32 and not mr.ranked_fit(125, 4, 16, 512)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(2048, 768, 128, 8), (4096, 1536, 128, 8), (6144, 1024, 128, 16)])
def test_token_rows_at_real_shapes_on_gpu(shape):
    """The 30b, 235b and user-config shapes at the decode batches the token-row path takes (above 64
    pairs, up to 16 tokens), plus one batch whose tokens all choose the same experts, and a 24-token
    batch in a 32-row tile (the kernels' wider form, not the engine's): the aligned
    grouped GEMMs' bits at the engine's tiles, and within the real-shape bound (2^-6 of the row's
    scale, tests/test_fused_moe.py) of the torch path."""
    H, I, E, k = shape
    for N in sorted({64 // k + 1, 12, 16, 24}):
        crowd = N if N == 12 else 0
        x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N, crowd=crowd)
        tiles = mr.rows_tiles(N, E, k, x.device)
        assert mr.rows_fit(N, k, 512) == (N <= 16)
        got = mr.rows_gemms(x, w13, w2, ids, w, tiles)
        assert torch.equal(got, _aligned(x, w13, w2, w, ids, tiles)), N
        _close(fm.combine_k(got.view(N, k, H)), experts_grouped(x, w13, w2, ids, w), 2 ** -6)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(2048, 768, 128, 8), (6144, 1024, 128, 16)])
def test_ranked_rows_at_real_shapes_on_gpu(shape):
    """The ranked form at the 30b and user-config shapes from one row tile up to 512 pairs, and a
    batch whose tokens all choose the same experts (each of those experts loops over 4 row tiles):
    the aligned grouped GEMMs' bits at grouped_tiles' tiles, and within the real-shape bound of the
    torch path."""
    H, I, E, k = shape
    for N in sorted({17, 24, 512 // k, 512 // k - 3}):
        crowd = N if N == 512 // k else 0
        x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N + 7, crowd=crowd)
        tiles = fm.grouped_tiles(N * k, E, x.device)
        assert mr.ranked_fit(N, k, E, 512, x.device)
        got = mr.rows_gemms(x, w13, w2, ids, w, tiles, ranked=True)
        assert torch.equal(got, _aligned(x, w13, w2, w, ids, tiles)), N
        _close(fm.combine_k(got.view(N, k, H)), experts_grouped(x, w13, w2, ids, w), 2 ** -6)


def test_stage_through_token_rows_and_ranked_rows_matches_reference_interpreted():
    """One user-mini layer (top-4 of 16), bf16, a 9-token prefill then a 3-row decode step, through
    the Stage with the MoE on the token-row form, then on the ranked form (GEMV path only up to 4
    pairs, so both steps group their pairs), against the torch backend: outputs and KV cache."""
    from model.backend import Backend
    taken, real = [], md.experts_rows
    backends = {"ref": Backend("ref", "torch", False),
                "rows": Backend("ref", "triton", True, moe_small_max_pairs=4, moe_rows_max_pairs=64),
                "ranked": Backend("ref", "triton", True, moe_small_max_pairs=4, moe_ranked_max_pairs=64)}
    try:
        md.experts_rows = lambda *a, **kw: taken.append(kw.get("ranked", False)) or real(*a, **kw)
        outs = tfm.mini_layer_runs(backends)
    finally:
        md.experts_rows = real
    assert taken == [False, False, True, True]  # each step of each fused backend on its form
    for name in ("rows", "ranked"):
        for r, f in zip(outs["ref"], outs[name]):
            _close(f.reshape(-1, r.shape[-1]), r.reshape(-1, r.shape[-1]))


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_stage_decode_on_token_rows_matches_reference_on_gpu():
    """Two layers of the 30b shape with the default CUDA kernels, a 12-row decode step (96 pairs:
    the token-row form) and a 40-row one (the align, or the ranked form when on), against the torch
    reference backend on the same weights and KV, allowing for routing near-ties (tests/routing_ties.py)."""
    from dataclasses import replace

    from model.backend import Backend, pick_backend
    from model.batch import AttnBatch
    from routing_ties import assert_close_up_to_routing_ties, moe_inputs
    from test_fused_moe import _two_layer_stage
    stage = _two_layer_stage("qwen3-30b-a3b", "cuda")
    fused = pick_backend("cuda")
    backends = {"ref": Backend("sdpa", "torch", False), "fused": fused,
                "ranked": replace(fused, moe_ranked_max_pairs=512)}
    g = torch.Generator().manual_seed(3)
    runs = {}
    for name, be in backends.items():
        stage.backend = be
        stage.allocate_kv(64, 16)
        stage.kv_cache.copy_(torch.randn(stage.kv_cache.shape, generator=g).to(stage.kv_cache) if name == "ref"
                             else runs["ref_kv"])
        if name == "ref":
            runs["ref_kv"] = stage.kv_cache.clone()
        runs[name] = []
        for B in (12, 40):
            ids = torch.randint(0, stage.cfg.vocab_size, (B,), generator=torch.Generator().manual_seed(B)).cuda()
            ctx = [5 + (3 * i) % 11 for i in range(B)]  # one 16-slot block each
            batch = AttnBatch.build([1] * B, ctx, [[i % 64] for i in range(B)], 16, [True] * B, "cuda")
            with moe_inputs(stage) as got:
                out = stage(ids, batch)
            runs[name].append((out, got))
    for name in ("fused", "ranked"):
        for (r, in_r), (f, in_f) in zip(runs["ref"], runs[name]):
            assert_close_up_to_routing_ties(stage, r, f, in_r, in_f)
