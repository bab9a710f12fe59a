"""Routing and the expert grouping of a small micro-batch in one launch (CUDA, or TRITON_INTERPRET
in tests): after the router GEMM, one program takes every token's softmax, top-k and renorm
(model/moe_route_triton.py's, row by row) and groups the (token, expert) pairs by expert into
BM-row runs, as model/moe_align.align_by_expert (the reference) does. At decode sizes that one
launch replaces the top-k kernel and align_wide's zero fill and three launches, whose fixed costs
outweigh their work there (bench/bench_moe_prefill.py times both ways at 16 to 256 tokens).

Letters as model/moe.py: N tokens (N <= TILE_MAX_TOKENS), E experts, k per token, P = N * k
pairs, BT = next_power_of_2(N), BE = next_power_of_2(E), NB = moe_align._nblocks(P, E, BM).
Each run holds its expert's pairs in ascending pair order, the reference's stable sort order
(a token chooses an expert at most once, so within one expert pair order is token order)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_triton import _round
from .moe_align import RUNS_ROWS, _block_expert, _nblocks, _run_ends
from .pdl import launch_args, pdl_enter

# The most tokens one program takes: its [BT, BE] tiles stay in registers (the engine's threshold,
# model.backend.MOE_ROUTE_ALIGN_MAX_TOKENS, is at most this).
TILE_MAX_TOKENS = 64


@triton.jit(do_not_specialize=["N", "NB"])
def _route_align_kernel(logits_ptr, w_ptr, pairs_ptr, bexp_ptr, N, E, NB, stride_l, TOPK: tl.constexpr,
                        BT: tl.constexpr, BE: tl.constexpr, RENORM: tl.constexpr, BM: tl.constexpr,
                        RB: tl.constexpr, PDL: tl.constexpr):
    """w [N, k] (routing weights in the dtype, slot order as the top-k's), pairs [NB * BM] (pair
    index t * k + slot, P for padding), bexp [NB] (each block's expert, E past the last run)."""
    pdl_enter(PDL)
    t = tl.arange(0, BT)
    cols = tl.arange(0, BE)
    tmask = t < N
    cmask = cols < E
    x = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride_l + cols[None, :],
                mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))  # rows past N read zeros: finite, then dropped
    mx = tl.max(x, axis=1)
    ex = tl.where(cmask[None, :], tl.exp(x - mx[:, None]), 0.0)
    probs = ex / tl.sum(ex, axis=1)[:, None]
    vals = tl.where(cmask[None, :], probs, -1.0)
    picked = tl.zeros([BT, BE], dtype=tl.int32)  # slot + 1 of each chosen expert, 0 elsewhere
    total = tl.zeros([BT], dtype=tl.float32)
    for j in range(TOPK):  # ties: the lower expert id first
        m = tl.max(vals, axis=1)
        idx = tl.min(tl.where(vals == m[:, None], cols[None, :], BE), axis=1)
        hit = cols[None, :] == idx[:, None]
        picked = tl.where(hit, j + 1, picked)
        total += m
        vals = tl.where(hit, -2.0, vals)
    DT: tl.constexpr = w_ptr.dtype.element_ty
    w = probs / total[:, None] if RENORM else probs
    sel = (picked > 0) & tmask[:, None]
    slot = picked - 1
    pair = t[:, None] * TOPK + slot
    tl.store(w_ptr + pair, _round(w, DT).to(DT), mask=sel)

    # the grouping: runs in expert order, each padded to BM rows; a pair's row in its run is the
    # number of earlier tokens that chose the same expert
    onehot = sel.to(tl.int32)
    counts = tl.sum(onehot, axis=0)  # [BE]
    padded, pend = _run_ends(counts, BM)
    start = pend - padded
    rank = tl.cumsum(onehot, axis=0) - onehot  # [BT, BE], exclusive
    tl.store(pairs_ptr + start[None, :] + rank, pair.to(tl.int64), mask=sel)
    P = N * TOPK
    for b0 in range(0, NB, RB):  # every block's expert, and padding on the rows no pair takes
        b = b0 + tl.arange(0, RB)
        e = _block_expert(b, pend, E, BM, BE)
        tl.store(bexp_ptr + b, e, mask=b < NB)
        pad_from = tl.sum(tl.where(cols[None, :] == e[:, None], (start + counts)[None, :], 0), axis=1)
        pad_from = tl.where(e < E, pad_from, 0)
        r = (b * BM)[:, None] + tl.arange(0, BM)[None, :]
        pad = (b[:, None] < NB) & (r >= pad_from[:, None])
        tl.store(pairs_ptr + r, tl.full([RB, BM], 0, tl.int64) + P, mask=pad)


def route_align(logits_NE: torch.Tensor, top_k: int, norm_topk_prob: bool, BM: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_Nk in the logits' dtype, pairs [NB * BM] int64, bexp [NB] int64) from the router's logits
    [N, E], N <= TILE_MAX_TOKENS: route_fused's weights and align_by_expert's grouping of
    its choices, in one launch."""
    N, E = logits_NE.shape
    assert 0 < N <= TILE_MAX_TOKENS and logits_NE.stride(1) == 1, logits_NE.shape
    nb = _nblocks(N * top_k, E, BM)
    dev = logits_NE.device
    w = torch.empty(N, top_k, dtype=logits_NE.dtype, device=dev)
    pairs = torch.empty(nb * BM, dtype=torch.int64, device=dev)
    bexp = torch.empty(nb, dtype=torch.int64, device=dev)
    BT = max(16, triton.next_power_of_2(N))
    _route_align_kernel[(1,)](logits_NE, w, pairs, bexp, N, E, nb, logits_NE.stride(0), TOPK=top_k, BT=BT,
                              BE=triton.next_power_of_2(E), RENORM=norm_topk_prob, BM=BM,
                              RB=max(1, RUNS_ROWS // BM), num_warps=8 if BT >= 64 else 4, **launch_args(dev))
    return w, pairs, bexp
