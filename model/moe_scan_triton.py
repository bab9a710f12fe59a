"""The grouped expert GEMMs at decode sizes, with the grouping by expert done inside the GEMMs
(CUDA; tests run them under TRITON_INTERPRET=1). Letters as model/moe.py: N tokens, H hidden,
E experts, k experts per token, I expert width, P = N * k (token, expert) pairs.

model/fused_moe_triton.experts_large first groups the pairs by expert (model/moe_align: a fill
and three launches), then runs the two grouped GEMMs over the aligned blocks. Here one program
per (expert, N tile) instead reads all P expert ids, ranks the pairs of its own expert (ascending
pair index) and runs them as BM-row tiles: no align launches and no grouping written to memory
and read back. Programs of experts no pair chose exit after the scan. Up to a few hundred pairs
the scan (P ids, a [BM, BP] rank match per row tile) is small beside the expert weights each
program streams.

The tile maths are the grouped kernels' pointer-load path (model/fused_moe_triton
._gate_up_grouped_kernel / _down_grouped_kernel with TMA off): the same tiles give the same bits,
since a row's result does not depend on its place in a tile. act is [P, I] in pair order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_moe_triton import _DOT_FP32, _dot, _silu_mul, combine_k, grouped_tiles
from .fused_triton import _round
from .pdl import launch_args, pdl_enter

# The MoE takes this path from model.backend.MOE_SMALL_MAX_PAIRS up to Backend.moe_scan_max_pairs
# pairs, and only where a row tile's rank match, BM x next_power_of_2(P), stays within this many
# elements (registers of one program).
MAX_MATCH = 8192


@triton.jit
def _expert_pairs(ids_ptr, P, e, BP: tl.constexpr):
    """(hit [BP], rank [BP], count): which of the P pairs chose expert e, each one's rank among
    them in pair order, and how many did."""
    p = tl.arange(0, BP)
    hit = (tl.load(ids_ptr + p, mask=p < P, other=-1) == e).to(tl.int32)
    return hit, tl.cumsum(hit, 0) - 1, tl.sum(hit, 0)


@triton.jit
def _tile_rows(hit, rank, count, c0, P, BM: tl.constexpr, BP: tl.constexpr):
    """The pair index of expert e's ranks c0 .. c0 + BM - 1 (P where the expert has fewer), and
    which of them are real."""
    slot = c0 + tl.arange(0, BM)
    sel = (hit[None, :] != 0) & (rank[None, :] == slot[:, None])  # [BM, BP]
    rows = tl.sum(tl.where(sel, tl.arange(0, BP)[None, :], 0), axis=1)
    real = slot < count
    return tl.where(real, rows, P), real


@triton.jit(do_not_specialize=["P"])
def _gate_up_scan_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, P, H, I, stride_xt, stride_we, stride_wn, stride_at,
                         TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         BP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """act[p, n tile] = SiLU(x_t W_gate^T) * (x_t W_up^T) for each pair p = (t, j) of expert
    program_id(0), columns of N tile program_id(1)."""
    pdl_enter(PDL)
    e = tl.program_id(0)
    hit, rank, count = _expert_pairs(ids_ptr, P, e, BP)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < I
    wg_base = w_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    wu_base = wg_base + I * stride_wn
    DT: tl.constexpr = act_ptr.dtype.element_ty
    for c0 in range(0, count, BM):
        rows, rmask = _tile_rows(hit, rank, count, c0, P, BM, BP)
        tok = (rows // TOPK).to(tl.int64)
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < H
            a = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            wm = kmask[:, None] & nmask[None, :]
            wg = tl.load(wg_base + kk[:, None], mask=wm, other=0.0)
            wu = tl.load(wu_base + kk[:, None], mask=wm, other=0.0)
            acc_g = _dot(a, wg, acc_g, PREC, UPCAST)
            acc_u = _dot(a, wu, acc_u, PREC, UPCAST)
        out = _silu_mul(acc_g, acc_u, DT)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_at + n[None, :], out.to(DT),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["P"])
def _down_scan_kernel(act_ptr, w_ptr, ids_ptr, tw_ptr, y_ptr, P, H, I, stride_at, stride_we, stride_wn, stride_yt,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """y[p, n tile] = (act[p] W_down^T) * routing weight of p, for each pair p of expert
    program_id(0), columns of N tile program_id(1)."""
    pdl_enter(PDL)
    e = tl.program_id(0)
    hit, rank, count = _expert_pairs(ids_ptr, P, e, BP)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < H
    w_base = w_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    DT: tl.constexpr = y_ptr.dtype.element_ty
    for c0 in range(0, count, BM):
        rows, rmask = _tile_rows(hit, rank, count, c0, P, BM, BP)
        arow = rows.to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, I, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < I
            a = tl.load(act_ptr + arow[:, None] * stride_at + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            w = tl.load(w_base + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a, w, acc, PREC, UPCAST)
        tw = tl.load(tw_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        y = _round(_round(acc, DT) * tw[:, None], DT)
        tl.store(y_ptr + arow[:, None] * stride_yt + n[None, :], y.to(DT), mask=rmask[:, None] & nmask[None, :])


def scan_fits(P: int, E: int, max_pairs: int, device: torch.device | None = None) -> bool:
    """Whether P pairs take this path: at most max_pairs, and the row tile's rank match small."""
    return 0 < P <= max_pairs and grouped_tiles(P, E, device)[0] * triton.next_power_of_2(P) <= MAX_MATCH


def scan_gemms(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor, ids_Nk: torch.Tensor,
               w_Nk: torch.Tensor, tiles: tuple[int, ...]) -> torch.Tensor:
    """y [P, H] in pair order, as model/fused_moe_triton.grouped_gemms gives it (TMA off) at the same
    tiles (BM, BN, BK, warps, stages), without an align."""
    N, H = x_NH.shape
    k = ids_Nk.shape[1]
    E, I = w13_E2IH.shape[0], w2_EHI.shape[2]
    P = N * k
    assert x_NH.stride(1) == 1 and w13_E2IH.is_contiguous() and w2_EHI.is_contiguous()
    BM, BN, BK, nw, ns = tiles
    ids, tw = ids_Nk.contiguous(), w_Nk.contiguous()
    BP = max(16, triton.next_power_of_2(P))
    pdl = launch_args(x_NH.device)
    act = torch.empty(P, I, dtype=x_NH.dtype, device=x_NH.device)
    _gate_up_scan_kernel[(E, triton.cdiv(I, BN))](
        x_NH, w13_E2IH, ids, act, P, H, I, x_NH.stride(0), w13_E2IH.stride(0), w13_E2IH.stride(1), act.stride(0),
        TOPK=k, BM=BM, BN=BN, BK=BK, BP=BP, PREC="ieee", UPCAST=_DOT_FP32, num_warps=nw, num_stages=ns, **pdl)
    y = torch.empty(P, H, dtype=x_NH.dtype, device=x_NH.device)
    _down_scan_kernel[(E, triton.cdiv(H, BN))](
        act, w2_EHI, ids, tw, y, P, H, I, act.stride(0), w2_EHI.stride(0), w2_EHI.stride(1), y.stride(0),
        BM=BM, BN=BN, BK=BK, BP=BP, PREC="ieee", UPCAST=_DOT_FP32, num_warps=nw, num_stages=ns, **pdl)
    return y


def experts_scan(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor, ids_Nk: torch.Tensor,
                 w_Nk: torch.Tensor, tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """The experts' output [N, H]: scan_gemms at grouped_tiles' tiles, then the fp32 sum over the k
    terms (combine_k), as experts_large."""
    N, H = x_NH.shape
    k = ids_Nk.shape[1]
    tiles = tiles or grouped_tiles(N * k, w13_E2IH.shape[0], x_NH.device)
    return combine_k(scan_gemms(x_NH, w13_E2IH, w2_EHI, ids_Nk, w_Nk, tiles).view(N, k, H))
