"""The grouped expert GEMMs at decode sizes, with the grouping by expert done inside the GEMMs
(CUDA; tests run them under TRITON_INTERPRET=1). Letters as model/moe.py: N tokens, H hidden,
E experts, k experts per token, I expert width, P = N * k (token, expert) pairs.

model/fused_moe_triton.experts_large first groups the pairs by expert (model/moe_align: a fill
and three launches), then runs the two grouped GEMMs over the aligned blocks. Here one program
per (expert, N tile) finds its expert's rows itself, in one of two forms:
- token rows (N <= BM): row r of the one row tile is token r; the program reads the [N, k] expert
  ids and keeps the rows of the tokens that chose its expert (a token chooses an expert at most
  once), masking the others. No loop over row tiles.
- ranked (any N): the program ranks its expert's pairs in pair order over all P ids and takes
  them BM at a time; the first row tile is straight-line code, an expert with more than BM pairs
  loops over the rest.
Either way no align launches and no grouping written to memory and read back; programs of
experts no token chose exit after reading the ids.

The tile maths are the grouped kernels' pointer-load path (model/fused_moe_triton
._gate_up_grouped_kernel / _down_grouped_kernel with TMA off): the same (BM, BN, BK) tiles give the
same bits, since a row's result does not depend on its place in a tile. act is [P, I] in pair
order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_moe_triton import _DOT_FP32, _dot, _silu_mul, combine_k, gate_up_rows, grouped_tiles
from .fused_triton import _round
from .pdl import launch_args, pdl_enter

# The most tokens the token-row form takes, all in one row tile. Wider row tiles cost more than the
# align they save (bench/bench_moe_rows.py times row tiles of 16, 32 and 64 beside it).
MAX_ROWS = 16
# The ranked form's rank match, BM x next_power_of_2(P) elements, stays within this (one program's
# registers).
MAX_MATCH = 8192


@triton.jit
def _expert_rows(ids_ptr, N, e, TOPK: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr):
    """(pairs [BM], real [BM], count): for each token row r, the pair index r * TOPK + j of its
    choice j of expert e; which rows chose e; how many did. ids [N, TOPK] contiguous."""
    t = tl.arange(0, BM)
    j = tl.arange(0, KP)
    idv = tl.load(ids_ptr + t[:, None] * TOPK + j[None, :], mask=(t < N)[:, None] & (j < TOPK)[None, :], other=-1)
    hit = idv == e
    real = tl.max(hit.to(tl.int32), axis=1) > 0
    pairs = t * TOPK + tl.sum(tl.where(hit, j[None, :], 0), axis=1)
    return pairs, real, tl.sum(real.to(tl.int32), axis=0)


@triton.jit
def _ranked_rows(ids_ptr, P, e, c0, BM: tl.constexpr, BP: tl.constexpr):
    """(pairs [BM], real [BM], count): the pairs of expert e ranked c0 .. c0 + BM - 1 in pair order
    (P past its last), which of them are real, and how many pairs chose e."""
    p = tl.arange(0, BP)
    hit = (tl.load(ids_ptr + p, mask=p < P, other=-1) == e).to(tl.int32)
    rank = tl.cumsum(hit, 0) - 1
    count = tl.sum(hit, 0)
    slot = c0 + tl.arange(0, BM)
    sel = (hit[None, :] != 0) & (rank[None, :] == slot[:, None])  # [BM, BP]
    real = slot < count
    return tl.where(real, tl.sum(tl.where(sel, p[None, :], 0), axis=1), P), real, count


@triton.jit
def _tile(ids_ptr, N, e, c0, TOPK: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr,
          RANKED: tl.constexpr):
    """(tok [BM], pairs [BM], real [BM], count) of expert e's row tile from rank c0: RANKED, its
    pairs in pair order (tok = pair // TOPK); else row r is token r (c0 unused)."""
    if RANKED:
        pairs, real, count = _ranked_rows(ids_ptr, N * TOPK, e, c0, BM, BP)
        tok = (pairs // TOPK).to(tl.int64)
    else:
        pairs, real, count = _expert_rows(ids_ptr, N, e, TOPK, KP, BM)
        tok = tl.arange(0, BM).to(tl.int64)
    return tok, pairs, real, count


@triton.jit
def _gate_up_tile(x_ptr, wg_base, wu_base, act_ptr, tok, pairs, real, n, nmask, H, stride_xt, stride_at,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    acc_g, acc_u = gate_up_rows(x_ptr, tok, real, wg_base, wu_base, nmask, H, stride_xt,
                                tl.zeros([BM, BN], dtype=tl.float32), tl.zeros([BM, BN], dtype=tl.float32),
                                BK, PREC, UPCAST)
    DT: tl.constexpr = act_ptr.dtype.element_ty
    out = _silu_mul(acc_g, acc_u, DT)
    tl.store(act_ptr + pairs.to(tl.int64)[:, None] * stride_at + n[None, :], out.to(DT),
             mask=real[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["N"])
def _gate_up_rows_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, N, H, I, stride_xt, stride_we, stride_wn, stride_at,
                         TOPK: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, BP: tl.constexpr, RANKED: tl.constexpr, PREC: tl.constexpr,
                         UPCAST: tl.constexpr, PDL: tl.constexpr):
    """act[p, n tile] = SiLU(x_t W_gate^T) * (x_t W_up^T) for each pair p = (t, j) of expert
    program_id(0), columns of N tile program_id(1). The first row tile is straight-line code;
    RANKED experts with more than BM pairs loop over the rest."""
    pdl_enter(PDL)
    e = tl.program_id(0)
    tok, pairs, real, count = _tile(ids_ptr, N, e, 0, TOPK, KP, BM, BP, RANKED)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < I
    if count == 0:
        return
    wg_base = w_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    wu_base = wg_base + I * stride_wn
    _gate_up_tile(x_ptr, wg_base, wu_base, act_ptr, tok, pairs, real, n, nmask, H, stride_xt, stride_at,
                  BM, BN, BK, PREC, UPCAST)
    if RANKED:
        for c0 in range(BM, count, BM):
            tok, pairs, real, _count = _tile(ids_ptr, N, e, c0, TOPK, KP, BM, BP, RANKED)
            _gate_up_tile(x_ptr, wg_base, wu_base, act_ptr, tok, pairs, real, n, nmask, H, stride_xt, stride_at,
                          BM, BN, BK, PREC, UPCAST)


@triton.jit
def _down_tile(act_ptr, w_base, tw_ptr, y_ptr, pairs, real, n, nmask, I, stride_at, stride_yt, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    arow = pairs.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < I
        a = tl.load(act_ptr + arow[:, None] * stride_at + kk[None, :], mask=real[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_base + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _dot(a, w, acc, PREC, UPCAST)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    tw = tl.load(tw_ptr + pairs, mask=real, other=0.0).to(tl.float32)
    y = _round(_round(acc, DT) * tw[:, None], DT)
    tl.store(y_ptr + arow[:, None] * stride_yt + n[None, :], y.to(DT), mask=real[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["N"])
def _down_rows_kernel(act_ptr, w_ptr, ids_ptr, tw_ptr, y_ptr, N, H, I, stride_at, stride_we, stride_wn, stride_yt,
                      TOPK: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      BP: tl.constexpr, RANKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                      PDL: tl.constexpr):
    """y[p, n tile] = (act[p] W_down^T) * routing weight of p, for each pair p of expert
    program_id(0), columns of N tile program_id(1); row tiles as the gate/up kernel."""
    pdl_enter(PDL)
    e = tl.program_id(0)
    _tok, pairs, real, count = _tile(ids_ptr, N, e, 0, TOPK, KP, BM, BP, RANKED)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < H
    if count == 0:
        return
    w_base = w_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    _down_tile(act_ptr, w_base, tw_ptr, y_ptr, pairs, real, n, nmask, I, stride_at, stride_yt, BM, BN, BK, PREC,
               UPCAST)
    if RANKED:
        for c0 in range(BM, count, BM):
            _tok, pairs, real, _count = _tile(ids_ptr, N, e, c0, TOPK, KP, BM, BP, RANKED)
            _down_tile(act_ptr, w_base, tw_ptr, y_ptr, pairs, real, n, nmask, I, stride_at, stride_yt, BM, BN, BK,
                       PREC, UPCAST)


def rows_tiles(N: int, E: int, k: int, device: torch.device | None = None) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages): grouped_tiles' column tiles at N * k pairs, the row tile raised
    to hold all N tokens."""
    BM, BN, BK, nw, ns = grouped_tiles(N * k, E, device)
    return max(BM, triton.next_power_of_2(N)), BN, BK, nw, ns


def rows_fit(N: int, k: int, max_pairs: int) -> bool:
    """Whether N tokens at top-k take the token-row form: at most max_pairs pairs, all tokens in one
    row tile."""
    return 0 < N * k <= max_pairs and N <= MAX_ROWS


def ranked_fit(N: int, k: int, E: int, max_pairs: int, device: torch.device | None = None) -> bool:
    """Whether N tokens at top-k take the ranked form (at grouped_tiles' tiles): at most max_pairs
    pairs, and the rank match within MAX_MATCH."""
    P = N * k
    return 0 < P <= max_pairs and grouped_tiles(P, E, device)[0] * triton.next_power_of_2(P) <= MAX_MATCH


def rows_gemms(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor, ids_Nk: torch.Tensor,
               w_Nk: torch.Tensor, tiles: tuple[int, ...], ranked: bool = False) -> torch.Tensor:
    """y [P, H] in pair order, as model/fused_moe_triton.grouped_gemms gives it (TMA off) at the same
    tiles (BM, BN, BK, warps, stages), without an align. ranked: each program ranks its expert's
    pairs into BM-row tiles (any N); else row r is token r (N <= BM)."""
    N, H = x_NH.shape
    k = ids_Nk.shape[1]
    E, I = w13_E2IH.shape[0], w2_EHI.shape[2]
    BM, BN, BK, nw, ns = tiles
    assert (ranked or N <= BM) and x_NH.stride(1) == 1 and w13_E2IH.is_contiguous() and w2_EHI.is_contiguous()
    ids, tw = ids_Nk.contiguous(), w_Nk.contiguous()
    KP = triton.next_power_of_2(k)
    BP = max(16, triton.next_power_of_2(N * k)) if ranked else 16
    pdl = launch_args(x_NH.device)
    act = torch.empty(N * k, I, dtype=x_NH.dtype, device=x_NH.device)
    _gate_up_rows_kernel[(E, triton.cdiv(I, BN))](
        x_NH, w13_E2IH, ids, act, N, H, I, x_NH.stride(0), w13_E2IH.stride(0), w13_E2IH.stride(1), act.stride(0),
        TOPK=k, KP=KP, BM=BM, BN=BN, BK=BK, BP=BP, RANKED=ranked, PREC="ieee", UPCAST=_DOT_FP32, num_warps=nw,
        num_stages=ns, **pdl)
    y = torch.empty(N * k, H, dtype=x_NH.dtype, device=x_NH.device)
    _down_rows_kernel[(E, triton.cdiv(H, BN))](
        act, w2_EHI, ids, tw, y, N, H, I, act.stride(0), w2_EHI.stride(0), w2_EHI.stride(1), y.stride(0),
        TOPK=k, KP=KP, BM=BM, BN=BN, BK=BK, BP=BP, RANKED=ranked, PREC="ieee", UPCAST=_DOT_FP32, num_warps=nw,
        num_stages=ns, **pdl)
    return y


def experts_rows(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor, ids_Nk: torch.Tensor,
                 w_Nk: torch.Tensor, tiles: tuple[int, ...] | None = None, ranked: bool = False) -> torch.Tensor:
    """The experts' output [N, H]: rows_gemms (at rows_tiles' tiles, ranked at grouped_tiles'), then
    the fp32 sum over the k terms (combine_k), as experts_large."""
    N, H = x_NH.shape
    k, E = ids_Nk.shape[1], w13_E2IH.shape[0]
    tiles = tiles or (grouped_tiles(N * k, E, x_NH.device) if ranked else rows_tiles(N, E, k, x_NH.device))
    return combine_k(rows_gemms(x_NH, w13_E2IH, w2_EHI, ids_Nk, w_Nk, tiles, ranked).view(N, k, H))
