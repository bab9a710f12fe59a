"""Fused MoE experts in Triton (CUDA; tests run them under TRITON_INTERPRET=1). Letters as moe.py:
N tokens, H hidden, E experts, k experts per token, I expert width, P = N * k (token, expert) pairs.

Two paths, both without a host sync (capturable in the decode CUDA graph):
- small (N * k <= model.backend.MOE_SMALL_MAX_PAIRS): one program per (pair, column tile) streams only the chosen
  expert's rows as a GEMV. Kernel 1: gate and up, SiLU(gate) * up in its epilogue -> act [P, I].
  Kernel 2: down projection, scaled by the routing weight, the k contributions of each token summed
  in fp32 -> out [N, H]; each program loads its columns of all k experts at once. Column tiles are
  small so every SM streams weights at batch 1.
- large: the pairs are grouped by expert on the device, each expert's rows padded to the tile
  (model/moe_align.py, as vLLM's moe_align_block_size), then a grouped GEMM with the same epilogues.

model/moe_dispatch.py picks among these and model/moe_rows_triton.py's grouped GEMMs without an
align. Rounding follows the torch reference (model/moe.py): the projections rounded to the dtype,
SiLU and the product rounded, y * w rounded, the k terms summed in fp32, rounded once.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .fused_triton import _round
from .moe_align import align
from .pdl import launch_args, pdl_enter
from .tma import capable as tma_capable
from .tma import rows_ok as tma_rows_ok
from .tma import use_descriptors


# The interpreter's tl.dot returns garbage for bf16 operands (triton 3.9): there, dot in fp32,
# which is exact for bf16 values (products fit fp32; accumulation is fp32 either way).
_DOT_FP32 = os.environ.get("TRITON_INTERPRET") == "1"
# The grouped GEMMs read weight tiles (and the down GEMM its act tiles) by TMA descriptor from this
# row tile up, where the device has TMA: the prefill tile (128 rows; bench/bench_moe_prefill.py
# times both loads).
TMA_MIN_BM = 128


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _silu_mul(g, u, DT: tl.constexpr):
    g = _round(g, DT)
    u = _round(u, DT)
    s = _round(g / (1.0 + tl.exp(-g)), DT)
    return _round(s * u, DT)


# ---- small batch: per-pair GEMV ------------------------------------------------------------------
@triton.jit
def _gate_up_gemv_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, I, stride_xt, stride_we, stride_wn, stride_at,
                         H: tl.constexpr, TOPK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    p = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < I
    t = (p // TOPK).to(tl.int64)
    e = tl.load(ids_ptr + p).to(tl.int64)
    wg_base = w_ptr + e * stride_we + n[:, None].to(tl.int64) * stride_wn
    wu_base = wg_base + I * stride_wn
    acc_g = tl.zeros([BN], dtype=tl.float32)
    acc_u = tl.zeros([BN], dtype=tl.float32)
    for k0 in tl.static_range(0, H, BK):  # unrolled (H is a constexpr): every load issued at once
        kk = k0 + tl.arange(0, BK)
        kmask = kk < H
        xv = tl.load(x_ptr + t * stride_xt + kk, mask=kmask, other=0.0).to(tl.float32)
        m2 = nmask[:, None] & kmask[None, :]
        wg = tl.load(wg_base + kk[None, :], mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(wu_base + kk[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xv[None, :], axis=1)
        acc_u += tl.sum(wu * xv[None, :], axis=1)
    DT: tl.constexpr = act_ptr.dtype.element_ty
    a = _silu_mul(acc_g, acc_u, DT)
    tl.store(act_ptr + p.to(tl.int64) * stride_at + n, a.to(DT), mask=nmask)


@triton.jit
def _down_combine_gemv_kernel(act_ptr, w_ptr, ids_ptr, tw_ptr, out_ptr, H, stride_at, stride_we, stride_wn,
                              stride_ot, I: tl.constexpr, TOPK: tl.constexpr, BTOPK: tl.constexpr,
                              BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """One program: BN output columns of one token, all k chosen experts at once ([BTOPK, BN, BK]
    tiles, the K loop unrolled), so the k experts' weight rows are loaded together rather than
    one expert after another."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < H
    j = tl.arange(0, BTOPK)
    jmask = j < TOPK
    p = t * TOPK + j  # [BTOPK] pair indices
    e = tl.load(ids_ptr + p, mask=jmask, other=0).to(tl.int64)
    w_base = w_ptr + e[:, None, None] * stride_we + n[None, :, None].to(tl.int64) * stride_wn
    wmask = jmask[:, None, None] & nmask[None, :, None]
    acc = tl.zeros([BTOPK, BN], dtype=tl.float32)
    for k0 in tl.static_range(0, I, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < I
        a = tl.load(act_ptr + p[:, None] * stride_at + kk[None, :], mask=jmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_base + kk[None, None, :], mask=wmask & kmask[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[:, None, :], axis=2)
    DT: tl.constexpr = out_ptr.dtype.element_ty
    tw = tl.load(tw_ptr + p, mask=jmask, other=0.0).to(tl.float32)
    y = _round(_round(acc, DT) * tw[:, None], DT)  # padded experts: weight 0, y 0
    tl.store(out_ptr + t * stride_ot + n, _round(tl.sum(y, axis=0), DT).to(DT), mask=nmask)


def small_tiles(N: int, H: int, I: int, k: int) -> tuple[int, int, int, int, int, int]:
    """(BN1, BK1, warps1, BN2, BK2, warps2) of the GEMV path: narrow column tiles at small N so
    that the programs cover every SM several times over at batch 1."""
    # Up to 16 pairs: wide K steps over few rows, so each program streams long contiguous weight
    # runs (bench/bench_decode_layer.py --sweep times other tiles).
    # The down GEMV loads all k experts' tiles at once, BN2 * BK2 * next_power_of_2(k) elements a step.
    if N * k <= 16:
        return 4, 1024, 4, 2, 256, 4
    return 16, 256, 4, 8, 64, 4


def experts_small(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor, ids_Nk: torch.Tensor,
                  w_Nk: torch.Tensor, tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """The per-pair GEMV path. tiles = (BN1, BK1, warps1, BN2, BK2, warps2) overrides small_tiles."""
    N, H = x_NH.shape
    k = ids_Nk.shape[1]
    I = w2_EHI.shape[2]
    assert x_NH.stride(1) == 1 and w13_E2IH.is_contiguous() and w2_EHI.is_contiguous()
    ids, tw = ids_Nk.contiguous(), w_Nk.contiguous()
    bn1, bk1, nw1, bn2, bk2, nw2 = tiles or small_tiles(N, H, I, k)
    if tiles is None:  # top-16 and more: a narrower K step keeps the [k, BN2, BK2] tile in registers
        bk2 = min(bk2, max(32, 4096 // (triton.next_power_of_2(k) * bn2)))
    act = torch.empty(N * k, I, dtype=x_NH.dtype, device=x_NH.device)
    _gate_up_gemv_kernel[(N * k, triton.cdiv(I, bn1))](
        x_NH, w13_E2IH, ids, act, I, x_NH.stride(0), w13_E2IH.stride(0), w13_E2IH.stride(1), act.stride(0),
        H=H, TOPK=k, BN=bn1, BK=min(bk1, triton.next_power_of_2(H)), num_warps=nw1, **launch_args(x_NH.device))
    out = torch.empty(N, H, dtype=x_NH.dtype, device=x_NH.device)
    _down_combine_gemv_kernel[(N, triton.cdiv(H, bn2))](
        act, w2_EHI, ids, tw, out, H, act.stride(0), w2_EHI.stride(0), w2_EHI.stride(1), out.stride(0),
        I=I, TOPK=k, BTOPK=triton.next_power_of_2(k), BN=bn2, BK=min(bk2, triton.next_power_of_2(I)), num_warps=nw2,
        **launch_args(x_NH.device))
    return out


# ---- large batch: pairs grouped by expert, grouped GEMM ------------------------------------------
@triton.jit
def gate_up_rows(x_ptr, tok, rmask, wg_base, wu_base, nmask, H, stride_xt, acc_g, acc_u, BK: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(acc_g, acc_u) += x rows tok (those in rmask; the others zeros) times the gate and up weight
    tiles at wg_base / wu_base ([BK, BN] steps along H, columns in nmask), by pointer loads."""
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < H
        a = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wm = kmask[:, None] & nmask[None, :]
        wg = tl.load(wg_base + kk[:, None], mask=wm, other=0.0)
        wu = tl.load(wu_base + kk[:, None], mask=wm, other=0.0)
        acc_g = _dot(a, wg, acc_g, PREC, UPCAST)
        acc_u = _dot(a, wu, acc_u, PREC, UPCAST)
    return acc_g, acc_u


@triton.jit
def _block_and_tile(N_MAJOR: tl.constexpr):
    """(block, N tile) of this program. The grid is (blocks, N tiles), or with N_MAJOR (N tiles,
    blocks): a block's N tiles then run side by side and share its A rows in L2, where otherwise
    the blocks run side by side and share one N tile of an expert's weights."""
    if N_MAJOR:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _block_rows(pairs_ptr, bexp_ptr, P, E, BM: tl.constexpr, b):
    """Block b of align_by_expert's output: its expert (int64; E past the end), its BM pair rows
    (padding and blocks past the end read as P) and which of them are real."""
    e = tl.load(bexp_ptr + b).to(tl.int64)
    rows = tl.load(pairs_ptr + b * BM + tl.arange(0, BM), mask=tl.arange(0, BM) < tl.where(e < E, BM, 0), other=P)
    return e, rows, rows < P


@triton.jit
def _gate_up_grouped_kernel(x_ptr, w_ptr, pairs_ptr, bexp_ptr, act_ptr, P, H, I, E, stride_xt, stride_we,
                            stride_wn, stride_at, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, N_MAJOR: tl.constexpr,
                            TMA: tl.constexpr):
    """act rows b * BM .. b * BM + BM - 1 (block order, padding rows 0) = SiLU(x W_gate^T) * (x W_up^T)
    of block b's pairs, columns of N tile pn. x rows are gathered by token; with TMA the weight
    tiles come by descriptor over w13 seen as [E * 2I, H] (a gate tile running past I reads up rows
    and an up tile the next expert's, only into columns the store masks; past the end, zeros)."""
    b, pn = _block_and_tile(N_MAJOR)
    e, rows, rmask = _block_rows(pairs_ptr, bexp_ptr, P, E, BM, b)
    if e >= E:  # a block past the last expert's padded run
        return
    tok = rows // TOPK
    n = pn * BN + tl.arange(0, BN)
    nmask = n < I
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    if TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * 2 * I, H], strides=[stride_wn, 1],
                                           block_shape=[BN, BK])
        wg_row = (e * 2 * I + pn * BN).to(tl.int32)
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :], mask=rmask[:, None] & (kk < H)[None, :],
                        other=0.0)
            acc_g = _dot(a, tl.trans(w_desc.load([wg_row, k0])), acc_g, PREC, UPCAST)
            acc_u = _dot(a, tl.trans(w_desc.load([wg_row + I, k0])), acc_u, PREC, UPCAST)
    else:
        wg_base = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn
        acc_g, acc_u = gate_up_rows(x_ptr, tok, rmask, wg_base, wg_base + I * stride_wn, nmask, H, stride_xt,
                                    acc_g, acc_u, BK, PREC, UPCAST)
    DT: tl.constexpr = act_ptr.dtype.element_ty
    out = _silu_mul(acc_g, acc_u, DT)
    arow = b.to(tl.int64) * BM + tl.arange(0, BM)
    tl.store(act_ptr + arow[:, None] * stride_at + n[None, :], out.to(DT), mask=nmask[None, :])


@triton.jit
def _down_grouped_kernel(act_ptr, w_ptr, pairs_ptr, bexp_ptr, tw_ptr, y_ptr, P, H, I, E, R, stride_at, stride_we,
                         stride_wn, stride_yt, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr, N_MAJOR: tl.constexpr, TMA: tl.constexpr):
    """y rows of block b's pairs (pair order), columns of N tile pn = (act_b W_down^T) * routing weight.
    act_b: act's rows b * BM .. (block order, R rows in all). With TMA both tiles come by
    descriptor (w2 seen as [E * H, I]: a tile past H reads the next expert's rows, only into masked
    columns)."""
    b, pn = _block_and_tile(N_MAJOR)
    e, rows, rmask = _block_rows(pairs_ptr, bexp_ptr, P, E, BM, b)
    if e >= E:  # a block past the last expert's padded run
        return
    n = pn * BN + tl.arange(0, BN)
    nmask = n < H
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if TMA:
        a_desc = tl.make_tensor_descriptor(act_ptr, shape=[R, I], strides=[stride_at, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * H, I], strides=[stride_wn, 1],
                                           block_shape=[BN, BK])
        a_row = (b * BM).to(tl.int32)
        w_row = (e * H + pn * BN).to(tl.int32)
        for k0 in range(0, I, BK):
            acc = _dot(a_desc.load([a_row, k0]), tl.trans(w_desc.load([w_row, k0])), acc, PREC, UPCAST)
    else:
        arow = b.to(tl.int64) * BM + tl.arange(0, BM)
        w_base = w_ptr + e * stride_we + n[None, :].to(tl.int64) * stride_wn
        for k0 in range(0, I, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < I
            a = tl.load(act_ptr + arow[:, None] * stride_at + kk[None, :], mask=kmask[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a, w, acc, PREC, UPCAST)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    tw = tl.load(tw_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    y = _round(_round(acc, DT) * tw[:, None], DT)
    tl.store(y_ptr + rows[:, None] * stride_yt + n[None, :], y.to(DT), mask=rmask[:, None] & nmask[None, :])


@functools.lru_cache(maxsize=None)
def _wide_smem(device_index: int) -> bool:
    """The device's shared memory a block holds grouped_tiles' decode tiles (their stages of A and
    weight tiles: about 140 KB at the widest); without the opt-in figure, by compute capability."""
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return optin >= 140 * 1024 if optin else (props.major, props.minor) in ((8, 0), (9, 0), (10, 0))


def grouped_tiles(P: int, E: int, device: torch.device | None = None) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages): BM near the rows per expert, so that a block holds one expert's
    rows with little padding; the (128, 128) tile once experts hold more than 96 rows each. At decode
    sizes (16-row tiles) the GEMMs stream expert weights: long K steps, and at most 4 rows an expert
    (batch 64 and less at top-8 of 128) wide N tiles too (bench/bench_moe_prefill.py --tokens
    16,64,256 --sweep times the others). device: a CUDA device without the shared memory for those
    decode tiles keeps (16, 64, 64, 4, 3); None (and CPU): the tiles above."""
    per_expert = P / E
    if per_expert > 96:
        return 128, 128, 64, 8, 3
    if per_expert <= 16 and device is not None and device.type == "cuda" and not _wide_smem(
            device.index if device.index is not None else torch.cuda.current_device()):
        return 16, 64, 64, 4, 3
    if per_expert <= 4:
        return 16, 128, 128, 8, 2
    if per_expert <= 16:
        return 16, 64, 128, 4, 3
    return (32 if per_expert <= 48 else 64), 64, 64, 4, 3


def experts_large(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor, ids_Nk: torch.Tensor,
                  w_Nk: torch.Tensor, tiles: tuple[int, ...] | None = None,
                  n_major_min_bm: int = 0) -> torch.Tensor:
    """Pairs grouped by expert into BM-row blocks (moe_align.align), grouped_gemms, then the fp32
    sum over the k terms in one pass (combine_k: half the time of torch's bf16 reduce plus cast)."""
    N, H = x_NH.shape
    k = ids_Nk.shape[1]
    tiles = tiles or grouped_tiles(N * k, w13_E2IH.shape[0], x_NH.device)
    pairs, bexp = align(ids_Nk, w13_E2IH.shape[0], tiles[0])
    y = grouped_gemms(x_NH, w13_E2IH, w2_EHI, pairs, bexp, w_Nk, tiles, n_major_min_bm).view(N, k, H)
    return combine_k(y)


def grouped_gemms(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor, pairs: torch.Tensor,
                  bexp: torch.Tensor, w_Nk: torch.Tensor, tiles: tuple[int, ...],
                  n_major_min_bm: int = 0, tma: bool | None = None) -> torch.Tensor:
    """y [P, H] in pair order: the gate/up GEMM with the SiLU * up epilogue into act [blocks * BM, I]
    (block order), then the down GEMM with the routing-weight epilogue, over the blocks of an align
    (pairs [nblocks * BM], bexp [nblocks]). tiles: (BM, BN, BK, warps, stages), BM the align's. Row
    tiles of at least n_major_min_bm (0: none) launch each block's N tiles together (N_MAJOR).
    tma: weight tiles (and the down GEMM's act tiles) by TMA descriptor; None: where the device has
    TMA and the row tile is at least TMA_MIN_BM."""
    N, H = x_NH.shape
    k = w_Nk.shape[1]
    E, I = w13_E2IH.shape[0], w2_EHI.shape[2]
    P = N * k
    assert x_NH.stride(1) == 1 and w13_E2IH.is_contiguous() and w2_EHI.is_contiguous()
    BM, BN, BK, nw, ns = tiles
    prec = "ieee"  # fp32 operands exactly (no tf32); bf16 operands are unaffected
    nb = bexp.numel()
    tw = w_Nk.contiguous()
    nm = 0 < n_major_min_bm <= BM
    grid = (lambda n_tiles: (n_tiles, nb)) if nm else (lambda n_tiles: (nb, n_tiles))
    act = torch.empty(nb * BM, I, dtype=x_NH.dtype, device=x_NH.device)
    if tma is None:
        tma = BM >= TMA_MIN_BM and tma_capable(x_NH)
    tma = tma and tma_rows_ok(w13_E2IH.view(-1, H), w2_EHI.view(-1, I), act)
    if tma:
        use_descriptors()
    _gate_up_grouped_kernel[grid(triton.cdiv(I, BN))](
        x_NH, w13_E2IH, pairs, bexp, act, P, H, I, E, x_NH.stride(0), w13_E2IH.stride(0), w13_E2IH.stride(1),
        act.stride(0), TOPK=k, BM=BM, BN=BN, BK=BK, PREC=prec, UPCAST=_DOT_FP32, N_MAJOR=nm, TMA=tma,
        num_warps=nw, num_stages=ns)
    y = torch.empty(P, H, dtype=x_NH.dtype, device=x_NH.device)
    _down_grouped_kernel[grid(triton.cdiv(H, BN))](
        act, w2_EHI, pairs, bexp, tw, y, P, H, I, E, nb * BM, act.stride(0), w2_EHI.stride(0), w2_EHI.stride(1),
        y.stride(0), BM=BM, BN=BN, BK=BK, PREC=prec, UPCAST=_DOT_FP32, N_MAJOR=nm, TMA=tma, num_warps=nw,
        num_stages=ns)
    return y


@triton.jit(do_not_specialize=["N"])
def _combine_kernel(y_ptr, out_ptr, N, H, K: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """out[t, h] = sum over j < K of y[t, j, h], in fp32 in j order, rounded once to the dtype.
    y [N, K, H] and out [N, H] contiguous; a program owns BT tokens x BH columns."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    m = (t < N)[:, None] & (h < H)[None, :]
    src = y_ptr + (t.to(tl.int64) * K * H)[:, None] + h[None, :]
    acc = tl.zeros([BT, BH], dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(src + j * H, mask=m, other=0.0).to(tl.float32)
    DT: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + (t.to(tl.int64) * H)[:, None] + h[None, :], _round(acc, DT).to(DT), mask=m)


def combine_k(y_NkH: torch.Tensor) -> torch.Tensor:
    """The k experts' terms of each token summed in fp32 and rounded once (the reference's
    `y.sum(dim=1, dtype=float32).to(dtype)`), one pass over y instead of torch's reduce and cast."""
    N, k, H = y_NkH.shape
    y = y_NkH.contiguous()
    out = torch.empty(N, H, dtype=y.dtype, device=y.device)
    if N:
        BT, BH = 4, 512
        _combine_kernel[(triton.cdiv(N, BT), triton.cdiv(H, BH))](y, out, N, H, K=k, BT=BT, BH=BH, num_warps=4)
    return out
