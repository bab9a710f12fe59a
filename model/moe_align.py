"""Grouping the MoE's (token, expert) pairs by expert for the grouped GEMM (model/fused_moe_triton.
experts_large), on the device without a host sync: each expert's run padded to the row tile BM, as
vLLM's moe_align_block_size. Two ways to the same grouping: torch ops (align_by_expert, the
reference and the CPU path) and three Triton launches over many programs (align_wide, every P on
CUDA: at decode sizes its three short launches take less GPU time than one program walking every
pair, bench/bench_breakdown.py's "other" row); align() picks one.
Letters: N tokens, k experts per token, E experts, P = N * k pairs, BE = next_power_of_2(E),
NB = cdiv(P, BM) + min(E, P) blocks of BM rows (each hit expert pads by less than one block)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ALIGN_TILE = 128  # pairs per [ALIGN_TILE, BE] one-hot count tile
WIDE_TILE = 128  # pairs per program of align_wide's count and place launches (a power of two)
RUNS_ROWS = 1024  # rows per program of align_wide's runs launch (RUNS_ROWS // BM blocks)
# align_wide's int32 counters (expert counts, run cursors) sit LINE apart, one 128-byte line each:
# the place launch's per-pair atomics on different experts then queue at different L2 lines
# instead of all on the four lines that 128 adjacent counters share.
LINE = 32


def _nblocks(P: int, E: int, BM: int) -> int:
    return triton.cdiv(P, BM) + min(E, P)


def align_by_expert(ids_Nk: torch.Tensor, E: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by expert, each expert's run padded to a multiple of BM, on the device with a
    fixed-size output (no host sync). Returns sorted_pairs [NB * BM] (pair index, or P for
    padding) and block_expert [NB] (the expert of each BM-row block, or E past the end)."""
    flat = ids_Nk.reshape(-1)
    P = flat.numel()
    dev = flat.device
    nblocks = _nblocks(P, E, BM)
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


# ---- steps of align_wide's launches ---------------------------------------------------------------
@triton.jit
def _count_pairs(ids_ptr, c0, P, C: tl.constexpr, BE: tl.constexpr):
    """[BE] int32: how many of the pairs c0 .. c0 + C - 1 below P chose each expert (a [C, BE]
    one-hot sum; lanes past P load BE, which matches no expert)."""
    i = c0 + tl.arange(0, C)
    e = tl.load(ids_ptr + i, mask=i < P, other=BE).to(tl.int32)
    return tl.sum((e[:, None] == tl.arange(0, BE)[None, :]).to(tl.int32), axis=0)


@triton.jit
def _run_ends(counts, BM: tl.constexpr):
    """(padded, pend) [BE]: each expert's run rounded up to BM rows, and where each run ends (runs
    in expert order from row 0; an expert with no pairs has an empty run)."""
    padded = (counts + BM - 1) // BM * BM
    return padded, tl.cumsum(padded, 0)


@triton.jit
def _place_pairs(ids_ptr, pairs_ptr, cursor_ptr, c0, P, CW: tl.constexpr, CS: tl.constexpr):
    """Each of the pairs c0 .. c0 + CW - 1 below P to the next free row of its expert's run: rows
    handed out by atomics on cursor (int32, expert e's first free row at e * CS), so the order
    within a run is free; a row's GEMM result does not depend on its row in a tile."""
    i = c0 + tl.arange(0, CW)
    e = tl.load(ids_ptr + i, mask=i < P, other=0).to(tl.int32)
    dest = tl.atomic_add(cursor_ptr + e * CS, 1, mask=i < P)
    tl.store(pairs_ptr + dest, i.to(tl.int64), mask=i < P)


@triton.jit
def _block_expert(b, pend, E, BM: tl.constexpr, BE: tl.constexpr):
    """The expert of each block in b (int64): the number of runs ending at or before the block's
    first row (E past the last run)."""
    ended = (pend[None, :] <= (b * BM)[:, None]) & (tl.arange(0, BE)[None, :] < E)
    return tl.sum(ended.to(tl.int64), axis=1)


@triton.jit
def _count_steps(ids_ptr, c0, P, C: tl.constexpr, STEPS: tl.constexpr, BE: tl.constexpr):
    """[BE] int32 expert counts of the pairs c0 .. c0 + C * STEPS - 1 below P."""
    counts = tl.zeros([BE], dtype=tl.int32)
    for s in tl.static_range(STEPS):
        counts += _count_pairs(ids_ptr, c0 + s * C, P, C, BE)
    return counts


# ---- many programs: count, runs, place ------------------------------------------------------------
@triton.jit(do_not_specialize=["P"])
def _count_kernel(ids_ptr, counts_ptr, P, BE: tl.constexpr, C: tl.constexpr, STEPS: tl.constexpr,
                  CS: tl.constexpr):
    """Program g: the expert counts of pairs g * C * STEPS .. (g + 1) * C * STEPS - 1, added into
    counts (int32, expert e's at e * CS, zeroed before the launch) by one atomic per expert it
    holds."""
    counts = _count_steps(ids_ptr, tl.program_id(0) * (C * STEPS), P, C, STEPS, BE)
    tl.atomic_add(counts_ptr + tl.arange(0, BE) * CS, counts, mask=counts > 0)


@triton.jit(do_not_specialize=["P", "NB"])  # one variant per BM: P's class needs no warm-up of its own
def _runs_kernel(counts_ptr, cursor_ptr, pairs_ptr, bexp_ptr, P, E, NB, BM: tl.constexpr, BE: tl.constexpr,
                 RB: tl.constexpr, CS: tl.constexpr):
    """After the counts are complete (the previous launch), each program derives the runs from
    them and takes blocks g * RB .. (g + 1) * RB - 1: their experts, and padding (P) on each of
    their rows that no pair will take (a run's rows past its pairs, every row past the last run).
    Those rows are disjoint from the ones _place_kernel writes, so the two need no order. Program
    0 also writes each run's first row into cursor for _place_kernel. counts, cursor: expert e's
    int32 at e * CS."""
    ex = tl.arange(0, BE)
    counts = tl.load(counts_ptr + ex * CS)
    padded, pend = _run_ends(counts, BM)
    if tl.program_id(0) == 0:
        tl.store(cursor_ptr + ex * CS, pend - padded)
    b = tl.program_id(0) * RB + tl.arange(0, RB)
    e = _block_expert(b, pend, E, BM, BE)
    tl.store(bexp_ptr + b, e, mask=b < NB)
    pad_from = tl.sum(tl.where(ex[None, :] == e[:, None], (pend - padded + counts)[None, :], 0), axis=1)
    pad_from = tl.where(e < E, pad_from, 0)  # first padding row of the block's run; past the end, all rows
    r = (b * BM)[:, None] + tl.arange(0, BM)[None, :]
    pad = (b[:, None] < NB) & (r >= pad_from[:, None])
    tl.store(pairs_ptr + r, tl.full([RB, BM], 0, tl.int64) + P, mask=pad)


@triton.jit(do_not_specialize=["P"])
def _place_kernel(ids_ptr, pairs_ptr, cursor_ptr, P, CW: tl.constexpr, CS: tl.constexpr):
    """Program g: pairs g * CW .. (g + 1) * CW - 1 to free rows of their experts' runs."""
    _place_pairs(ids_ptr, pairs_ptr, cursor_ptr, tl.program_id(0) * CW, P, CW, CS)


def align_wide(ids_Nk: torch.Tensor, E: int, BM: int, tile: int = WIDE_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """align_by_expert's grouping (the same block experts and rows of padding; each run holds its
    expert's pairs in some order, as atomics hand out rows) in three launches over many programs:
    count (cdiv(P, tile) programs), runs (RUNS_ROWS rows each), place (cdiv(P, tile)). Stream order makes each launch
    see the previous one's writes; no host sync. tile: pairs per program (a power of two)."""
    flat = ids_Nk.reshape(-1)
    P = flat.numel()
    dev = flat.device
    nblocks = _nblocks(P, E, BM)
    BE = triton.next_power_of_2(E)
    C = min(ALIGN_TILE, tile)
    pairs = torch.empty(nblocks * BM, dtype=torch.int64, device=dev)
    bexp = torch.empty(nblocks, dtype=torch.int64, device=dev)
    scratch = torch.zeros(2, BE, LINE, dtype=torch.int32, device=dev)  # counts, then each run's cursor
    counts, cursor = scratch[0], scratch[1]
    grid = (max(1, triton.cdiv(P, tile)),)
    _count_kernel[grid](flat, counts, P, BE=BE, C=C, STEPS=tile // C, CS=LINE, num_warps=4)
    RB = max(1, RUNS_ROWS // BM)
    _runs_kernel[(triton.cdiv(nblocks, RB),)](counts, cursor, pairs, bexp, P, E, nblocks, BM=BM, BE=BE, RB=RB,
                                              CS=LINE, num_warps=4)
    _place_kernel[grid](flat, pairs, cursor, P, CW=tile, CS=LINE, num_warps=4)
    return pairs, bexp


def align(ids_Nk: torch.Tensor, E: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouping experts_large launches: align_wide where Triton runs (CUDA, or the interpreter),
    else the torch ops."""
    if ids_Nk.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return align_wide(ids_Nk, E, BM)
    return align_by_expert(ids_Nk, E, BM)
