"""The grouped expert GEMMs that find their experts' pairs themselves (model/moe_scan_triton.py)
against the aligned grouped GEMMs (model/fused_moe_triton.grouped_gemms, pointer loads): the same
bits at the same tiles, since a row's result does not depend on where the align puts it; and the
whole MoE against the torch reference (model/moe.experts_grouped). Experts of uneven size: one
taking every token (several row tiles), experts nobody chose, top-k not a power of two. Without
CUDA they run under TRITON_INTERPRET=1 at small shapes; @pytest.mark.gpu cases use the real shapes."""
import importlib
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from model import fused_moe_triton as fm  # noqa: E402
from model import moe_align as ma  # noqa: E402
from model import moe_scan_triton as ms  # noqa: E402
from model.moe import experts_grouped, route  # noqa: E402

if not _CUDA:
    import model.moe_route_triton as _route
    importlib.reload(_route)
    ma = importlib.reload(ma)
    fm = importlib.reload(fm)
    ms = importlib.reload(ms)
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
    scale = want.float().abs().amax(dim=-1, keepdim=True)
    err = ((got.float() - want.float()).abs() / scale).max().item()
    assert err <= bound, f"max error {err:.4f} of the row's scale"


@pytest.mark.parametrize("N,shape,crowd,tiles", [
    (5, (96, 32, 16, 4), 0, (16, 32, 32, 4, 1)),   # 20 pairs, most experts one or two rows
    (40, (96, 32, 16, 4), 40, (16, 32, 32, 4, 1)),  # experts 0..3 take every token: 3 row tiles each
    (7, (48, 40, 6, 3), 3, (16, 64, 64, 4, 1)),     # top-3 of 6, I = 40 not a multiple of BK or BN
    (24, (64, 32, 8, 2), 0, (32, 16, 32, 4, 1)),    # a 32-row tile, N tile narrower than I
])
def test_scan_gives_the_aligned_bits(N, shape, crowd, tiles):
    H, I, E, k = shape
    x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N + E, crowd=crowd)
    got = ms.scan_gemms(x, w13, w2, ids, w, tiles)
    assert torch.equal(got, _aligned(x, w13, w2, w, ids, tiles))
    _close(fm.combine_k(got.view(N, k, H)), experts_grouped(x, w13, w2, ids, w))


def test_unchosen_experts_write_nothing_and_every_pair_is_written():
    """Experts 0..k-1 take all 12 tokens (every other expert's programs find no pair and exit):
    every pair's row of y is the reference's, and none is left as the buffer's initial bytes."""
    H, I, E, k = 64, 32, 8, 2
    x, w13, w2, w, ids = _case(12, H, I, E, k, seed=5, crowd=12)
    assert set(ids.unique().tolist()) == {0, 1}
    got = ms.experts_scan(x, w13, w2, ids, w, tiles=(16, 32, 32, 4, 1))
    assert torch.isfinite(got).all()
    _close(got, experts_grouped(x, w13, w2, ids, w))


def test_fused_experts_takes_the_scan_path_between_the_thresholds(monkeypatch):
    """fused_experts: the GEMV path up to small_max_pairs, the scan path up to scan_max_pairs, the
    aligned grouped path above (or with scan_max_pairs 0); each against the reference."""
    taken = []
    for mod, name in ((fm, "experts_small"), (fm, "experts_large"), (ms, "experts_scan")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **kw: taken.append(_n) or _r(*a, **kw))
    H, I, E, k = 96, 32, 16, 4
    for N, scan_max, want_path in ((2, 32, "experts_small"), (6, 32, "experts_scan"), (9, 32, "experts_large"),
                                   (6, 0, "experts_large")):
        x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N)
        got = fm.fused_experts(x, w13, w2, ids, w, small_max_pairs=8, scan_max_pairs=scan_max)
        assert taken[-1] == want_path
        _close(got, experts_grouped(x, w13, w2, ids, w))


def test_scan_fits_bounds_the_rank_match():
    assert ms.scan_fits(512, 128, 512) and not ms.scan_fits(513, 128, 512)
    assert not ms.scan_fits(8, 128, 0) and not ms.scan_fits(0, 128, 512)
    # 16 experts at 500 pairs: 31 rows an expert, a 32-row tile x 512 ids = 16 384 > MAX_MATCH
    assert fm.grouped_tiles(500, 16)[0] == 32 and not ms.scan_fits(500, 16, 512)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(2048, 768, 128, 8), (4096, 1536, 128, 8), (6144, 1024, 128, 16)])
def test_scan_at_real_shapes_on_gpu(shape):
    """The 30b, 235b and user-config shapes at every decode batch size the scan path takes (above
    64 pairs, up to 512), plus one batch whose tokens all choose the same experts: the aligned
    grouped GEMMs' bits at the engine's tiles, and within the real-shape bound (2^-6 of the row's
    scale, tests/test_fused_moe.py) of the torch path."""
    H, I, E, k = shape
    for N in sorted({64 // k + 1, 16, 24, 32, 33, 64, 512 // k}):
        crowd = N if N == 33 else 0
        x, w13, w2, w, ids = _case(N, H, I, E, k, seed=N, crowd=crowd)
        tiles = fm.grouped_tiles(N * k, E, x.device)
        assert ms.scan_fits(N * k, E, 512, x.device)
        got = ms.scan_gemms(x, w13, w2, ids, w, tiles)
        assert torch.equal(got, _aligned(x, w13, w2, w, ids, tiles)), N
        _close(fm.combine_k(got.view(N, k, H)), experts_grouped(x, w13, w2, ids, w), 2 ** -6)
