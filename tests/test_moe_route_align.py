"""The one-launch routing and grouping of small micro-batches (model/moe_route_align.py) against
the two it replaces: route_fused's weights and experts (model/moe_route_triton.py, itself tested
against torch's route in test_fused_moe) and align_by_expert's grouping of them (the torch ops),
bit for bit: its runs hold their pairs in the reference's ascending order. Without CUDA under the
interpreter (test_fused_moe sets it up) at small shapes; @pytest.mark.gpu at the 30b shape."""
import pytest
import torch

import test_fused_moe as tfm  # sets TRITON_INTERPRET on CPU and reloads the kernel modules

_CUDA, DEV, fm, ma = tfm._CUDA, tfm.DEV, tfm.fm, tfm.ma
ra = fm.route_align.__globals__  # the module fused_moe_triton bound (reloaded on CPU)


def _logits(N, E, dtype, seed, tie=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, E, generator=g)
    if tie is not None:  # these experts share one logit in every row
        x[:, tie] = x[:, tie[:1]]
    return x.to(DEV, dtype)


def _check(N, k, E, BM, dtype, renorm, seed, tie=None):
    logits = _logits(N, E, dtype, seed, tie)
    w, pairs, bexp = fm.route_align(logits, k, renorm, BM)
    w_ref, ids_ref = fm.route_fused(logits, torch.eye(E, device=DEV, dtype=dtype), k, renorm,
                                    linear=lambda x, _: x)  # the same logits into the top-k kernel
    pr, br = ma.align_by_expert(ids_ref, E, BM)
    assert torch.equal(bexp, br) and torch.equal(pairs, pr), "grouping differs from align_by_expert"
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # one bf16 step: the sums run in another order
    assert ((w.float() - w_ref.float()).abs() <= tol * w_ref.float().abs() + 1e-7).all()
    assert w.dtype == dtype and pairs.dtype == bexp.dtype == torch.int64


@pytest.mark.parametrize("N,k,E,BM,dtype,renorm", [
    (1, 2, 8, 4, torch.float32, True), (5, 2, 6, 4, torch.bfloat16, True),  # E not a power of two
    (9, 8, 128, 16, torch.bfloat16, True), (16, 8, 128, 16, torch.bfloat16, False),
    (33, 4, 16, 16, torch.float32, True), (64, 8, 128, 16, torch.bfloat16, True),  # 64: every token tile
    (40, 8, 60, 32, torch.bfloat16, True)])
def test_one_launch_equals_route_then_align(N, k, E, BM, dtype, renorm):
    """Random logits: the same weights (within the renorm's summation order) and the same grouping,
    bit for bit, as the top-k kernel followed by align_by_expert; rows past N (the token tile is a
    power of two of at least 16) write nothing."""
    _check(N, k, E, BM, dtype, renorm, seed=N * 100 + E)


def test_ties_take_the_lower_expert_as_the_top_k_kernel():
    """Experts 3, 9 and 12 share one logit in every row: the same choice and order of slots."""
    _check(24, 4, 16, 16, torch.bfloat16, True, seed=5, tie=[3, 9, 12])


def test_fused_moe_takes_the_one_launch_path_and_matches_reference(monkeypatch):
    """fused_moe on the grouped path routes through route_align (a spy counts it) up to
    route_align_max_tokens tokens, and through the top-k kernel and align_wide past it; both
    outputs match the torch reference (routing by torch's route, the experts by experts_grouped)
    within the fused path's bound."""
    H, I, E, k = tfm.CPU_SHAPES["user-mini"]
    dtype = torch.bfloat16
    w13, w2, gate = tfm._weights(H, I, E, dtype, 3)
    x = tfm._x(12, H, dtype, 4)
    calls = []
    real = fm.route_align
    monkeypatch.setattr(fm, "route_align", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    _, w, ids = tfm.route(x, gate, k, True)
    want = tfm.experts_grouped(x, w13, w2, ids, w)
    for limit, expect in ((12, [(12, E)]), (11, [])):
        calls.clear()
        got = fm.fused_moe(x, gate, w13, w2, k, True, small_max_pairs=8, route_align_max_tokens=limit)
        assert calls == expect
        tfm.assert_close(got, want, dtype)


def test_route_align_refuses_more_tokens_than_its_tile():
    with pytest.raises(AssertionError):
        fm.route_align(_logits(ra["TILE_MAX_TOKENS"] + 1, 8, torch.float32, 0), 2, True, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N", [9, 16, 33, 48, 64])
def test_one_launch_on_gpu_at_decode_batches(N):
    """The 30b shape's decode batches on the grouped path (128 experts, top-8, its BM): the same
    weights and grouping as the top-k kernel and align_by_expert on the device."""
    E, k = 128, 8
    _check(N, k, E, fm.grouped_tiles(N * k, E)[0], torch.bfloat16, True, seed=N)
    _check(N, k, E, 16, torch.bfloat16, True, seed=N + 1, tie=[7, 100])
