"""A small-token GEMV (model/linear_triton.py) whose last program to finish runs a whole-row
epilogue, so the op after the projection costs no launch of its own. Two of them, each replacing
two kernels of a batch-1 decode layer:
- o_proj + residual add + RMSNorm (the post-attention norm): linear_add_norm.
- the router + fp32 softmax, top-k and renorm: route_small.

"Last program": each program stores its slice of y, then takes a ticket from a per-call-site
counter (an acq_rel atomic after a CTA barrier, so its stores are visible to whoever takes the
last ticket). The program with the last ticket reads all of y back from L2 (.cg) and resets the
counter to 0 for the next launch. Launches on one stream run one after another (PDL included:
model/pdl.py), so one counter serves a call site.

Rounding is that of the two kernels replaced: y rounded to the dtype, then the add+norm of
fused_triton or the top-k of fused_moe_triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_moe_triton import softmax_topk_store
from .fused_triton import _round
from .linear_triton import MAX_TOKENS, gemv_tile, small_linear_tiles
from .pdl import launch_args, pdl_enter

_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counter(w: torch.Tensor) -> torch.Tensor:
    """The int32 ticket counter of the call site that owns weight w (zero between launches)."""
    key = (w.device, w.data_ptr())
    c = _counters.get(key)
    if c is None:
        c = _counters[key] = torch.zeros(1, dtype=torch.int32, device=w.device)
    return c


@triton.jit
def _last_ticket(counter_ptr):
    """True in the program that finishes last (of tl.num_programs(0)); it resets the counter."""
    tl.debug_barrier()  # every thread's stores of this program precede the ticket
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = ticket == tl.num_programs(0) - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
    return last


@triton.jit(do_not_specialize=["T"])
def _linear_add_norm_kernel(x_ptr, w_ptr, y_ptr, res_ptr, nw_ptr, h_ptr, m_ptr, counter_ptr, T, N, K, eps,
                            stride_xt, stride_wn, stride_yt, stride_rt, stride_ht,
                            BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
                            PDL: tl.constexpr):
    pdl_enter(PDL)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.arange(0, BT)
    nmask, tmask = n < N, t < T
    acc = gemv_tile(x_ptr, w_ptr, t, tmask, n, nmask, K, stride_xt, stride_wn, BT, BN, BK)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    tl.store(y_ptr + t[:, None] * stride_yt + n[None, :], _round(acc, DT).to(DT), mask=tmask[:, None] & nmask[None, :])
    if _last_ticket(counter_ptr):
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        nw = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        for tt in range(T):
            y = tl.load(y_ptr + tt * stride_yt + cols, mask=cmask, other=0.0, cache_modifier=".cg").to(tl.float32)
            r = tl.load(res_ptr + tt * stride_rt + cols, mask=cmask, other=0.0).to(tl.float32)
            h = _round(y + r, DT)  # the residual sum in the dtype, as torch's add
            tl.store(h_ptr + tt * stride_ht + cols, h.to(DT), mask=cmask)
            inv = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
            tl.store(m_ptr + tt * stride_ht + cols, _round(nw * _round(h * inv, DT), DT).to(DT), mask=cmask)


def linear_add_norm(x_TK: torch.Tensor, w_NK: torch.Tensor, residual_TN: torch.Tensor, norm_w_N: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x w^T + residual), x w^T + residual), as F.linear then fused_triton's
    add_rms_norm_fused, in one launch. 1 <= T <= MAX_TOKENS."""
    T, K = x_TK.shape
    N = w_NK.shape[0]
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"linear_add_norm takes 1 to {MAX_TOKENS} tokens, got {T}")
    assert residual_TN.shape == (T, N) and residual_TN.stride(1) == 1 and x_TK.stride(1) == 1
    BN, BK, nw = small_linear_tiles(T, N, K)
    y, h, m = (torch.empty(T, N, dtype=x_TK.dtype, device=x_TK.device) for _ in range(3))
    _linear_add_norm_kernel[(triton.cdiv(N, BN),)](
        x_TK, w_NK, y, residual_TN, norm_w_N, h, m, _counter(w_NK), T, N, K, eps,
        x_TK.stride(0), w_NK.stride(0), y.stride(0), residual_TN.stride(0), h.stride(0),
        BT=triton.next_power_of_2(T), BN=BN, BK=BK, BLOCK_N=triton.next_power_of_2(N), num_warps=nw,
        **launch_args(x_TK.device))
    return m, h


@triton.jit(do_not_specialize=["T"])
def _route_small_kernel(x_ptr, g_ptr, logit_ptr, w_ptr, ids_ptr, counter_ptr, T, E, H, stride_xt, stride_gn,
                        TOPK: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        BE: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.arange(0, BT)
    nmask, tmask = n < E, t < T
    acc = gemv_tile(x_ptr, g_ptr, t, tmask, n, nmask, H, stride_xt, stride_gn, BT, BN, BK)
    DT: tl.constexpr = logit_ptr.dtype.element_ty
    tl.store(logit_ptr + t[:, None] * E + n[None, :], _round(acc, DT).to(DT), mask=tmask[:, None] & nmask[None, :])
    if _last_ticket(counter_ptr):
        cols = tl.arange(0, BE)
        cmask = cols < E
        for tt in range(T):
            x = tl.load(logit_ptr + tt * E + cols, mask=cmask, other=float("-inf"), cache_modifier=".cg")
            softmax_topk_store(x.to(tl.float32), cols, cmask, w_ptr + tt * TOPK, ids_ptr + tt * TOPK, TOPK, BE,
                               RENORM)


def route_small(x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, norm_topk_prob: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_moe_triton.route_fused's (topk_w in dt, topk_ids int64), in one launch."""
    T, H = x_TH.shape
    E = gate_EH.shape[0]
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"route_small takes 1 to {MAX_TOKENS} tokens, got {T}")
    assert x_TH.stride(1) == 1 and gate_EH.is_contiguous()
    BN, BK, nw = small_linear_tiles(T, E, H)
    logits = torch.empty(T, E, dtype=x_TH.dtype, device=x_TH.device)
    w = torch.empty(T, top_k, dtype=x_TH.dtype, device=x_TH.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=x_TH.device)
    _route_small_kernel[(triton.cdiv(E, BN),)](
        x_TH, gate_EH, logits, w, ids, _counter(gate_EH), T, E, H, x_TH.stride(0), gate_EH.stride(0),
        TOPK=top_k, BT=triton.next_power_of_2(T), BN=BN, BK=BK, BE=triton.next_power_of_2(E),
        RENORM=norm_topk_prob, num_warps=nw, **launch_args(x_TH.device))
    return w, ids
