"""Grouping the MoE's (token, expert) pairs by expert for the grouped GEMM (model/fused_moe_triton.
experts_large), on the device without a host sync: each expert's run padded to the row tile BM, as
vLLM's moe_align_block_size. Two ways to the same grouping: torch ops (align_by_expert), or one
Triton launch (align_fused; model.backend.MOE_ALIGN_MAX_PAIRS says up to how many pairs).
Letters: N tokens, k experts per token, E experts, P = N * k pairs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ALIGN_TILE = 128  # pairs per step of _align_kernel


def align_by_expert(ids_Nk: torch.Tensor, E: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by expert, each expert's run padded to a multiple of BM, on the device with a
    fixed-size output (no host sync). Returns sorted_pairs [nblocks * BM] (pair index, or P for
    padding) and block_expert [nblocks] (the expert of each BM-row block, or E past the end)."""
    flat = ids_Nk.reshape(-1)
    P = flat.numel()
    dev = flat.device
    nblocks = triton.cdiv(P, BM) + min(E, P)  # each hit expert pads by less than one block
    counts = torch.zeros(E, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + BM - 1) // BM * BM
    pend = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = (pend - padded)[sorted_e] + rank
    sorted_pairs = torch.full((nblocks * BM,), P, dtype=torch.int64, device=dev)
    sorted_pairs.scatter_(0, dest, order)
    starts = torch.arange(nblocks, device=dev) * BM
    block_expert = torch.searchsorted(pend, starts, right=True)  # E past the last padded run
    return sorted_pairs, block_expert


@triton.jit(do_not_specialize=["P", "NB"])  # one variant per BM: P's class needs no warm-up of its own
def _align_kernel(ids_ptr, pairs_ptr, bexp_ptr, cursor_ptr, P, E, NB, BM: tl.constexpr, BE: tl.constexpr,
                  C: tl.constexpr, CW: tl.constexpr):
    """align_by_expert in one program (decode-sized P): expert counts, each run padded to BM, each
    pair to a free row of its expert's run, then each block's expert. Rows within a run are handed
    out by atomics on cursor [BE] (int32 scratch), so their order within the run may differ from
    align_by_expert's pair order; each row's GEMM result does not depend on its row in a tile.
    C: pairs per [C, BE] one-hot tile; CW: rows or pairs per step of the 1-D passes."""
    ex = tl.arange(0, BE)
    counts = tl.zeros([BE], dtype=tl.int32)
    for c0 in range(0, P, C):  # 1. how many pairs each expert holds ([C, BE] one-hot sums)
        i = c0 + tl.arange(0, C)
        e = tl.load(ids_ptr + i, mask=i < P, other=BE).to(tl.int32)
        counts += tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    padded = (counts + BM - 1) // BM * BM
    pend = tl.cumsum(padded, 0)  # end of each expert's padded run
    tl.atomic_xchg(cursor_ptr + ex, pend - padded)  # first free row of each run (at L2, as the adds below)
    for r0 in range(0, NB * BM, CW):  # 2. every row padding (P) until a pair lands on it
        r = r0 + tl.arange(0, CW)
        tl.store(pairs_ptr + r, tl.full([CW], 0, tl.int64) + P, mask=r < NB * BM)
    tl.debug_barrier()
    for c0 in range(0, P, CW):  # 3. each pair to the next free row of its expert's run
        i = c0 + tl.arange(0, CW)
        e = tl.load(ids_ptr + i, mask=i < P, other=0).to(tl.int32)
        dest = tl.atomic_add(cursor_ptr + e, 1, mask=i < P)
        tl.store(pairs_ptr + dest, i.to(tl.int64), mask=i < P)
    for b0 in range(0, NB, C):  # 4. a block's expert: runs ending at or before its first row
        b = b0 + tl.arange(0, C)
        ended = (pend[None, :] <= (b * BM)[:, None]) & (ex[None, :] < E)
        tl.store(bexp_ptr + b, tl.sum(ended.to(tl.int64), axis=1), mask=b < NB)


def align_fused(ids_Nk: torch.Tensor, E: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_by_expert's grouping from one launch of _align_kernel (no host sync): the same block
    experts and the same rows of padding; each run holds its expert's pairs in some order."""
    flat = ids_Nk.reshape(-1)
    P = flat.numel()
    nblocks = triton.cdiv(P, BM) + min(E, P)
    BE = triton.next_power_of_2(E)
    pairs = torch.empty(nblocks * BM, dtype=torch.int64, device=flat.device)
    bexp = torch.empty(nblocks, dtype=torch.int64, device=flat.device)
    cursor = torch.empty(BE, dtype=torch.int32, device=flat.device)
    _align_kernel[(1,)](flat, pairs, bexp, cursor, P, E, nblocks, BM=BM, BE=BE, C=ALIGN_TILE, CW=8 * ALIGN_TILE,
                        num_warps=8)
    return pairs, bexp

