"""Fused Triton kernels for the small per-token ops that otherwise cost one launch each: RMSNorm
(7 torch kernels -> 1), residual add + RMSNorm, and q/k-norm + rope (+ the KV-cache write). They
round where HF's eager code rounds (normalised value cast to the dtype before the weight multiply;
each rope product and the sum in the dtype), so results match the torch path to the last bit
except where fp32 reduction order flips a rounding. Chosen by model.backend (CUDA only)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_enter, pdl_release


@triton.jit
def _round(x, DT: tl.constexpr):
    """Round fp32 x to the nearest value of DT (bf16/fp16: nearest-even), kept in fp32. For bf16
    this is done on the bits: the compiler may fold a .to(bf16).to(fp32) round trip away, leaving
    the value unrounded, unlike torch's per-op rounding."""
    if DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    elif DT == tl.float32:
        return x
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _norm_tile(n_rows, H, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    """This program's ROWS rows (int64) x BLOCK_H columns of an [n_rows, H] norm, with the masks.
    Releases the dependent launch first: the GEMV after the norm may stream its weights beside it."""
    pdl_release(PDL)
    pdl_enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    return rows.to(tl.int64), cols, cmask, (rows[:, None] < n_rows) & cmask[None, :]


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, n_rows, H, stride_x, stride_o, eps,
                     BLOCK_H: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    rows64, cols, cmask, mask = _norm_tile(n_rows, H, BLOCK_H, ROWS, PDL)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    y = _round(x * r[:, None], DT)  # cast to the dtype before the weight multiply, as HF
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(o_ptr + rows64[:, None] * stride_o + cols[None, :], _round(w[None, :] * y, DT).to(DT), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, o_ptr, h_ptr, n_rows, H, stride_x, stride_r, stride_o, eps,
                         BLOCK_H: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    rows64, cols, cmask, mask = _norm_tile(n_rows, H, BLOCK_H, ROWS, PDL)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    res = tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = _round(x + res, DT)  # the residual sum in the dtype, as torch's add
    tl.store(h_ptr + rows64[:, None] * stride_o + cols[None, :], h.to(DT), mask=mask)
    r = tl.rsqrt(tl.sum(h * h, axis=1) / H + eps)
    y = _round(h * r[:, None], DT)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(o_ptr + rows64[:, None] * stride_o + cols[None, :], _round(w[None, :] * y, DT).to(DT), mask=mask)


def add_rms_norm_fused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for [T, H] rows (last dim contiguous)."""
    H = x.shape[-1]
    x2, r2 = x.reshape(-1, H), residual.reshape(-1, H)
    out, h = torch.empty_like(x2), torch.empty_like(x2)
    n = x2.shape[0]
    BLOCK_H = triton.next_power_of_2(H)
    ROWS = max(1, min(16, 4096 // BLOCK_H))
    _add_rms_norm_kernel[(triton.cdiv(n, ROWS),)](x2, r2, weight, out, h, n, H, x2.stride(0), r2.stride(0),
                                                  out.stride(0), eps, BLOCK_H=BLOCK_H, ROWS=ROWS,
                                                  num_warps=4 if BLOCK_H <= 2048 else 8, **launch_args(x.device))
    return out.view(x.shape), h.view(x.shape)


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm over the last dim of x [..., H] (last dim contiguous)."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    out = torch.empty_like(x2)
    n = x2.shape[0]
    BLOCK_H = triton.next_power_of_2(H)
    ROWS = max(1, min(16, 4096 // BLOCK_H))
    _rms_norm_kernel[(triton.cdiv(n, ROWS),)](x2, weight, out, n, H, x2.stride(0), out.stride(0), eps,
                                              BLOCK_H=BLOCK_H, ROWS=ROWS, num_warps=4 if BLOCK_H <= 2048 else 8,
                                              **launch_args(x.device))
    return out.view(x.shape)


@triton.jit
def _qkv_norm_rope_write_kernel(x_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                                n_rows, NQ, NKV, eps, stride_xt, stride_qt, stride_c,
                                HALF: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    """Rows are (token, head) for the NQ q heads then the NKV k heads of one qkv row [q | k | v].
    q heads: norm + rope -> q. k heads: norm + rope -> k cache at the token's slot, and the v head
    of the same index copied to the v cache (slot < 0: not stored)."""
    pdl_enter(PDL)
    heads = NQ + NKV
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    t = (rows // heads).to(tl.int64)
    h = (rows % heads).to(tl.int64)
    is_q = h < NQ
    c = tl.arange(0, HALF)
    m = rmask[:, None]
    xb = x_ptr + (t * stride_xt + h * (2 * HALF))[:, None] + c[None, :]  # k heads follow the q heads
    x1 = tl.load(xb, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xb + HALF, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
    DT: tl.constexpr = q_ptr.dtype.element_ty
    qw1, qw2 = tl.load(qw_ptr + c).to(tl.float32), tl.load(qw_ptr + HALF + c).to(tl.float32)
    kw1, kw2 = tl.load(kw_ptr + c).to(tl.float32), tl.load(kw_ptr + HALF + c).to(tl.float32)
    w1 = tl.where(is_q[:, None], qw1[None, :], kw1[None, :])
    w2 = tl.where(is_q[:, None], qw2[None, :], kw2[None, :])
    n1 = _round(w1 * _round(x1 * r[:, None], DT), DT)
    n2 = _round(w2 * _round(x2 * r[:, None], DT), DT)
    cb = (t * stride_c)[:, None] + c[None, :]
    cos = tl.load(cos_ptr + cb, mask=m, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cb, mask=m, other=0.0).to(tl.float32)
    o1 = _round(_round(n1 * cos, DT) + _round(-n2 * sin, DT), DT)
    o2 = _round(_round(n2 * cos, DT) + _round(n1 * sin, DT), DT)
    qm = m & is_q[:, None]
    qb = q_ptr + (t * stride_qt + h * (2 * HALF))[:, None] + c[None, :]
    tl.store(qb, o1.to(DT), mask=qm)
    tl.store(qb + HALF, o2.to(DT), mask=qm)
    slot = tl.load(slot_ptr + t, mask=rmask, other=-1).to(tl.int64)
    kh = h - NQ
    km = m & ((~is_q) & (slot >= 0))[:, None]
    CT: tl.constexpr = kc_ptr.dtype.element_ty
    cbase = (slot * NKV + kh) * (2 * HALF)
    kb = kc_ptr + cbase[:, None] + c[None, :]
    tl.store(kb, o1.to(CT), mask=km)
    tl.store(kb + HALF, o2.to(CT), mask=km)
    vsrc = x_ptr + (t * stride_xt + (NQ + NKV + kh) * (2 * HALF))[:, None] + c[None, :]
    v1 = tl.load(vsrc, mask=km, other=0.0)
    v2 = tl.load(vsrc + HALF, mask=km, other=0.0)
    vb = vc_ptr + cbase[:, None] + c[None, :]
    tl.store(vb, v1.to(CT), mask=km)
    tl.store(vb + HALF, v2.to(CT), mask=km)


def qkv_norm_rope_write(qkv_TX: torch.Tensor, q_weight_D: torch.Tensor, k_weight_D: torch.Tensor,
                        cos_TD: torch.Tensor, sin_TD: torch.Tensor, eps: float, nq: int, nkv: int,
                        k_cache_PSKD: torch.Tensor, v_cache_PSKD: torch.Tensor, slot_mapping_T: torch.Tensor
                        ) -> torch.Tensor:
    """From one qkv projection [T, (nq + 2 nkv) * D]: q = rope(norm(q)) [T, nq, D] is returned;
    rope(norm(k)) and v are written to the caches [P, S, nkv, D] at slot_mapping_T (one launch)."""
    T = qkv_TX.shape[0]
    D = k_cache_PSKD.shape[-1]
    assert qkv_TX.stride(-1) == 1 and cos_TD.stride(-1) == 1 and cos_TD.stride() == sin_TD.stride()
    assert k_cache_PSKD.is_contiguous() and v_cache_PSKD.is_contiguous()
    q = torch.empty(T, nq, D, dtype=qkv_TX.dtype, device=qkv_TX.device)
    n = T * (nq + nkv)
    ROWS = 16
    _qkv_norm_rope_write_kernel[(triton.cdiv(n, ROWS),)](
        qkv_TX, q_weight_D, k_weight_D, cos_TD, sin_TD, q, k_cache_PSKD, v_cache_PSKD, slot_mapping_T,
        n, nq, nkv, eps, qkv_TX.stride(0), q.stride(0), cos_TD.stride(0), HALF=D // 2, ROWS=ROWS, num_warps=4,
        **launch_args(qkv_TX.device))
    return q
