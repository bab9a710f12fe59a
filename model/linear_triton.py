"""y = x W^T for a few tokens (decode), as one Triton GEMV launched with PDL (model/pdl.py).
Letters: T tokens, K input features, N output features.

At batch 1 cuBLAS runs these (fused qkv, o_proj, the router) near their bytes, but each is a
kernel the graph must wait for, and o_proj takes two (split-K). Here every program streams BN
rows of W over all T tokens, accumulating in fp32, and rounds once to the output dtype, as a
cuBLAS bf16 GEMM does (the summation order differs: results match cuBLAS to a rounding step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_triton import _round
from . import pdl
from .pdl import launch_args, pdl_prefetched

MAX_TOKENS = 8  # the largest T this kernel takes (model.backend picks the switch)


@triton.jit(do_not_specialize=["T"])
def _linear_small_kernel(x_ptr, w_ptr, o_ptr, T, N, K, stride_xt, stride_wn, stride_ot,
                         BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.arange(0, BT)
    nmask, tmask = n < N, t < T
    w_base = w_ptr + n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    if PDL:  # model/pdl.py: the first [BN, BK] weight tile before waiting
        kk = tl.arange(0, BK)
        w0 = tl.load(w_base + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0)
        pdl_prefetched(PDL)
        x = tl.load(x_ptr + t[:, None] * stride_xt + kk[None, :], mask=tmask[:, None] & (kk < K)[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w0.to(tl.float32)[None, :, :], axis=2)
        k_first = BK
    else:
        k_first = 0
    for k0 in range(k_first, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        w = tl.load(w_base + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t[:, None] * stride_xt + kk[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # [BT, BN, BK] -> [BT, BN]
    DT: tl.constexpr = o_ptr.dtype.element_ty
    tl.store(o_ptr + t[:, None] * stride_ot + n[None, :], _round(acc, DT).to(DT), mask=tmask[:, None] & nmask[None, :])


def small_linear_tiles(T: int, N: int, K: int, prefetch: bool = False) -> tuple[int, int, int]:
    """(BN, BK, warps): about 4 096 products per program step (32 fp32 registers a thread at
    4 warps), narrow row tiles so that every SM streams W at batch 1. prefetch (with PDL, which
    loads the first step's tile before waiting): the whole row in one step up to 4 096."""
    BT = triton.next_power_of_2(max(1, T))
    if prefetch and BT == 1:
        BK = min(4096, triton.next_power_of_2(K))
        BN = max(1, min(4 if N >= 4096 else 2, 8192 // BK))
        return BN, BK, 8 if BN * BK >= 8192 else 4
    if BT == 1:  # wide rows (K >= 4096) and short outputs (the router) take the longer K step
        wide = K >= 4096 or N < 1024
        return (2, min(2048, triton.next_power_of_2(K)), 8) if wide else (4, min(1024, triton.next_power_of_2(K)), 4)
    BN = 4 if N >= 1024 else 2
    BK = min(triton.next_power_of_2(K), max(64, 4096 // (BT * BN)))
    return BN, BK, 4


def linear_small(x_TK: torch.Tensor, w_NK: torch.Tensor, tiles: tuple[int, int, int] | None = None
                 ) -> torch.Tensor:
    """x_TK @ w_NK^T for 1 <= T <= MAX_TOKENS, in x's dtype (fp32 accumulation)."""
    T, K = x_TK.shape
    N = w_NK.shape[0]
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"linear_small takes 1 to {MAX_TOKENS} tokens, got {T}")
    assert w_NK.shape[1] == K and x_TK.stride(1) == 1 and w_NK.stride(1) == 1, (x_TK.shape, w_NK.shape)
    BN, BK, nw = tiles or small_linear_tiles(T, N, K, pdl.enabled(x_TK.device))
    out = torch.empty(T, N, dtype=x_TK.dtype, device=x_TK.device)
    _linear_small_kernel[(triton.cdiv(N, BN),)](
        x_TK, w_NK, out, T, N, K, x_TK.stride(0), w_NK.stride(0), out.stride(0),
        BT=triton.next_power_of_2(T), BN=BN, BK=BK, num_warps=nw, **launch_args(x_TK.device))
    return out
