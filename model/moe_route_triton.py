"""The MoE's routing on CUDA in two launches: the router GEMM, then one Triton kernel for the
softmax over the experts, the top-k and the renorm (route() in model/moe.py is the reference)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_triton import _round
from .pdl import launch_args, pdl_enter


@triton.jit
def _topk_softmax_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, TOPK: tl.constexpr, BE: tl.constexpr,
                         RENORM: tl.constexpr, PDL: tl.constexpr):
    """One token per program: fp32 softmax over E, top-k (ties: the lower expert id first), renorm."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    x = tl.load(logits_ptr + t * stride_l + cols, mask=cmask, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, axis=0)
    ex = tl.where(cmask, tl.exp(x - mx), 0.0)
    probs = ex / tl.sum(ex, axis=0)
    vals = tl.where(cmask, probs, -1.0)
    picked = tl.zeros([BE], dtype=tl.int32)
    total = 0.0
    for j in range(TOPK):
        m = tl.max(vals, axis=0)
        idx = tl.min(tl.where(vals == m, cols, BE), axis=0)
        hit = cols == idx
        picked = tl.where(hit, j + 1, picked)  # slot + 1 of each chosen expert
        total += m
        vals = tl.where(hit, -2.0, vals)
    DT: tl.constexpr = w_ptr.dtype.element_ty
    slot = picked - 1
    w = probs / total if RENORM else probs
    sel = picked > 0
    tl.store(w_ptr + t * TOPK + slot, _round(w, DT).to(DT), mask=sel)
    tl.store(ids_ptr + t * TOPK + slot, cols.to(tl.int64), mask=sel)


def route_fused(x_NH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, norm_topk_prob: bool,
                linear=torch.nn.functional.linear) -> tuple[torch.Tensor, torch.Tensor]:
    """route()'s (topk_w_Nk in dt, topk_ids_Nk int64) in two launches: the router GEMM and one
    kernel for softmax, top-k and renorm. The chosen experts equal torch.topk's on the same
    logits; where equal probabilities straddle the k-th place torch's pick is unspecified, and
    this one takes the lower expert id. linear: the router GEMM (Backend.linear in the engine)."""
    logits = linear(x_NH, gate_EH)
    N, E = logits.shape
    w = torch.empty(N, top_k, dtype=x_NH.dtype, device=x_NH.device)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=x_NH.device)
    if N:
        _topk_softmax_kernel[(N,)](logits, w, ids, E, logits.stride(0), TOPK=top_k,
                                   BE=triton.next_power_of_2(E), RENORM=norm_topk_prob, num_warps=1,
                                   **launch_args(x_NH.device))
    return w, ids
