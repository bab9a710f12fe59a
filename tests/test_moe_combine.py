"""The grouped MoE's k-term sum (model/fused_moe_triton.combine_k) against naive maths (the terms
added in fp32 in order, rounded once) and torch's sum, and the grouped path that ends with it.
Without CUDA under the interpreter at small shapes
(test_fused_moe sets it up); @pytest.mark.gpu cases use the real shapes."""
import pytest
import torch

import test_fused_moe as tfm  # sets TRITON_INTERPRET on CPU and reloads the kernel modules
from model.moe import experts_grouped, route

_CUDA, DEV, fm, md, mrt = tfm._CUDA, tfm.DEV, tfm.fm, tfm.md, tfm.mrt
CPU_SHAPES, _weights, _x, assert_close = tfm.CPU_SHAPES, tfm._weights, tfm._x, tfm.assert_close


def _sum_k_in_order(y_NkH: torch.Tensor) -> torch.Tensor:
    """Naive maths: the k terms added one by one in fp32, rounded once to y's dtype."""
    acc = y_NkH[:, 0].float()
    for j in range(1, y_NkH.shape[1]):
        acc = acc + y_NkH[:, j].float()
    return acc.to(y_NkH.dtype)


@pytest.mark.parametrize("N,k,H,dtype", [(7, 8, 600, torch.bfloat16), (5, 3, 96, torch.bfloat16),
                                         (9, 1, 64, torch.bfloat16), (6, 4, 520, torch.float32), (0, 8, 64, torch.bfloat16)])
def test_combine_sums_the_k_terms_in_fp32(N, k, H, dtype):
    """combine_k against the terms added in fp32 in order and rounded once: the same bits (tokens
    not a multiple of the token tile, columns past one column tile, k not a power of two, k = 1,
    no tokens); and within one rounding step of torch's own sum (its own reduction order)."""
    g = torch.Generator().manual_seed(N * 100 + k)
    y = (torch.randn(N, k, H, generator=g) * torch.rand(N, k, 1, generator=g) * 4).to(DEV, dtype)
    got = fm.combine_k(y)
    assert got.shape == (N, H) and got.dtype == dtype
    assert torch.equal(got, _sum_k_in_order(y))
    if N:
        torch_sum = y.sum(dim=1, dtype=torch.float32).to(dtype).float()
        step = torch_sum.abs().clamp_min(2 ** -100) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -22)
        assert ((got.float() - torch_sum).abs() <= step).all()


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,k,H", [(8192, 8, 2048), (4099, 16, 6144), (16, 8, 2048)])
def test_combine_on_gpu_at_real_shapes(N, k, H):
    """combine_k at the 30b (8k prefill, a decode batch) and user-config shapes: the in-order fp32
    sum's bits."""
    g = torch.Generator().manual_seed(N + k)
    y = (torch.randn(N, k, H, generator=g) * 0.1).to(DEV, torch.bfloat16)
    assert torch.equal(fm.combine_k(y), _sum_k_in_order(y))


def test_grouped_path_sums_its_terms_with_combine():
    """experts_large (and fused_moe above the GEMV threshold) against the torch reference, and its
    output the in-order fp32 sum of grouped_gemms' k terms, bit for bit."""
    H, I, E, k = CPU_SHAPES["user-mini"]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, 61)
    x = _x(24, H, torch.bfloat16, 62)
    _, w, ids = route(x, gate, k, True)
    got = fm.experts_large(x, w13, w2, ids, w)
    assert_close(got, experts_grouped(x, w13, w2, ids, w), torch.bfloat16)
    tiles = fm.grouped_tiles(ids.numel(), E)
    pairs, bexp = fm.align(ids, E, tiles[0])
    terms = fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles).view(24, k, H)
    assert torch.equal(got, _sum_k_in_order(terms))
    wf, idsf = mrt.route_fused(x, gate, k, True)
    assert torch.equal(md.fused_moe(x, gate, w13, w2, k, True, small_max_pairs=8),
                       fm.experts_large(x, w13, w2, idsf, wf))
