"""Merging the split-K decode's partial results (model/attention_triton.py): each of a sequence's
splits leaves, per query head, its slice's output normalised by its own sum and that sum's
log-sum-exp (log2 units); the merge weighs them by exp2(lse - max lse).

  fused (merge_if_last)  the split kernel's last program of each (sequence, kv head) merges its G
                         heads itself, found by an arrival counter: no second launch. For split
                         counts whose partials fit one tile (G * splits <= FUSED_MERGE_ROWS rows),
                         the batches of 3 to 32 sequences the decode graphs capture.
  separate               _decode_merge_kernel, grid (B, N): many splits (batch 1-2 at long contexts,
                         up to 128), whose partials one program per kv head would read alone.

Letters as in model/attention_triton.py: B sequences, N query heads, K kv heads, G = N // K, D head_dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_enter, pdl_release

# Most partial rows (G heads x splits) the fused merge reads in one [G, splits, D] fp32 tile:
# 64 x 128 x 4 bytes is 64 registers a thread at 4 warps
FUSED_MERGE_ROWS = 64

_arrivals: dict[torch.device, torch.Tensor] = {}
_outgrown: list[torch.Tensor] = []  # replaced buffers, kept: a CUDA graph captured before may still use one


def fused_merge_splits(group: int) -> int:
    """The split tile of the fused merge for G = group query heads a kv head: splits up to this
    count merge in the split kernel."""
    return max(1, FUSED_MERGE_ROWS // triton.next_power_of_2(group))


def arrivals(device: torch.device, n: int) -> torch.Tensor:
    """int32 [>= n] zeros, one arrival counter per (sequence, kv head), kept per device: each
    merging program sets its counter back to 0, so every launch finds them at 0. Shared by the
    launches on a device, which the stream orders (each kernel waits for the one before it, PDL
    included); grown outside CUDA-graph capture (the eager warm-up of every captured shape runs
    first). The engine's fused launches have at most ~2 x SMs / 2 pairs (choose_num_splits), so the
    first 4096 counters last; a larger explicit call gets a new buffer and the old one stays alive."""
    buf = _arrivals.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _outgrown.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _arrivals[device] = buf
    return buf


@triton.jit
def slice_len(ctx, num_splits, BLOCK_N: tl.constexpr):
    """Keys of each split of a ctx-key context, BLOCK_N-aligned: the first cdiv(ctx, slice) splits
    hold keys, the rest none. The split kernel and the merge agree on it. (Slices of at least 128 to
    512 keys, fewer programs for short contexts, were slower at batch 1-16 in
    bench_decode_layer-style graphs: more programs overlap more loads.)"""
    return tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _merge_weights(lse, AXIS: tl.constexpr):
    """Each partial's weight exp2(lse - max lse) from the log-sum-exps lse [..., S] (log2 units), S
    at AXIS: an empty split (-inf) weighs 0, and so does every split of a row with none (padding
    heads, no keys)."""
    lse_max = tl.max(lse, AXIS)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    return tl.exp2(lse - tl.expand_dims(lse_max, AXIS))


@triton.jit
def _merge_sum(o, w, AXIS: tl.constexpr):
    """The merged output of partials o [..., S, D] (each normalised by its own sum) at weights w
    [..., S] (_merge_weights): 0 where all weights are 0."""
    return tl.sum(o * tl.expand_dims(w, AXIS + 1), AXIS) / tl.expand_dims(tl.maximum(tl.sum(w, AXIS), 1e-30), AXIS)


@triton.jit
def merge_if_last(o_part_ptr, lse_part_ptr, arrive_ptr, o_ptr, b, kh, used, num_splits, stride_ob, stride_on,
                  G: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
    """Called by each split program of (sequence b, kv head kh) that holds keys, after storing its
    partials: counts its arrival; the program that arrives last (of `used`) merges the G heads'
    partials [G, used, D] into o [B, N, D] and sets the counter back to 0.

    Ordering as CUTLASS's semaphore: a CTA barrier, then one release-acquire atomic, so every
    thread's partial stores come before the count that the last program acquires; the last
    program reads the partials past L1 (.cg), which never held another program's lines."""
    tl.debug_barrier()
    slot = arrive_ptr + b * tl.num_programs(1) + kh
    seen = tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu")
    if seen == used - 1:
        tl.store(slot, 0)
        offs_g = tl.arange(0, GP)
        offs_s = tl.arange(0, SP)
        offs_d = tl.arange(0, D)
        rows = (b * tl.num_programs(1) * G + kh * G + offs_g[:, None]).to(tl.int64) * num_splits + offs_s[None, :]
        mask = (offs_g[:, None] < G) & (offs_s[None, :] < used)  # [GP, SP]
        lse = tl.load(lse_part_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
        w = _merge_weights(lse, 1)  # [GP, SP]
        o = tl.load(o_part_ptr + rows[:, :, None] * D + offs_d[None, None, :], mask=mask[:, :, None], other=0.0,
                    cache_modifier=".cg")  # [GP, SP, D]
        o = _merge_sum(o, w, 1)
        heads = kh * G + offs_g
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_on + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=offs_g[:, None] < G)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    o_part_ptr, lse_part_ptr, ctx_ptr, o_ptr, stride_ob, stride_on, num_splits,
    N: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    pdl_release(PDL)  # o_proj's programs stream their weights while this waits
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    used = tl.cdiv(ctx, tl.maximum(slice_len(ctx, num_splits, BLOCK_N), 1))  # splits that hold keys (0: ctx 0)
    if used == 1:  # that split's program wrote the output
        return
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, D)
    mask_s = offs_s < used
    row = (b * N + h).to(tl.int64) * num_splits + offs_s  # [BLOCK_SPLITS]
    lse = tl.load(lse_part_ptr + row, mask=mask_s, other=float("-inf"))
    w = _merge_weights(lse, 0)
    o = tl.load(o_part_ptr + row[:, None] * D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    o = _merge_sum(o, w, 0)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_on + offs_d,
             o.to(o_ptr.dtype.element_ty))


def warm_decode_merge(num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                      block_ns: tuple[int, ...], max_splits: int = 128) -> None:
    """Compile the split-merge kernel at every BLOCK_SPLITS it can take (the split count's power of
    two, with its warp count) and each key step in block_ns: which one a step needs depends
    on its batch and context together (choose_num_splits), more combinations than a warm-up
    forward can visit."""
    for block_n in block_ns:
        _warm_merge(num_heads, head_dim, dtype, device, max_splits, block_n)


def _warm_merge(num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, max_splits: int,
                block_n: int) -> None:
    n = 1
    while True:
        s = min(n, max_splits)
        o_part = torch.zeros(1, num_heads, s, head_dim, device=device, dtype=torch.float32)
        lse_part = torch.zeros(1, num_heads, s, device=device, dtype=torch.float32)
        ctx = torch.full((1,), s * block_n, device=device, dtype=torch.int32)
        out = torch.empty(1, num_heads, head_dim, device=device, dtype=dtype)
        _decode_merge_kernel[(1, num_heads)](
            o_part, lse_part, ctx, out, out.stride(0), out.stride(1), s,
            N=num_heads, D=head_dim, BLOCK_N=block_n, BLOCK_SPLITS=triton.next_power_of_2(s),
            num_warps=8 if s > 32 else 4, **launch_args(device))
        if s == max_splits:
            return
        n *= 2
