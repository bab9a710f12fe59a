"""Paged decode attention, Triton kernels: the GPU path for the semantics of attention.attention_ref
at one query per sequence (prefill: model/attention_prefill_triton.py).

Letters: T tokens in the micro-batch, B sequences, N query heads, K kv heads (G = N // K query
heads per kv head), D head_dim, P blocks in the pool, S block size, M max blocks per sequence.

  paged_decode     one query per sequence; split-K ("flash decoding"): grid (B, K, splits), each
                   program takes the G query heads of one kv head over one slice of the context,
                   writes a partial output and its log-sum-exp, merged (model/attention_decode_merge.py)
                   by the last of them to finish when the splits are few, else by a second kernel.
                   With one split (many sequences) the programs write the output directly.

All metadata stays on the device (no host sync); the host ints the caller already knows
(max_query_len, max_context) only size the grids. K/V are gathered token by token through the
block table, so any power-of-two block size works independently of the kernel tile sizes.
Pointer offsets into the cache are int64 (a 90k-token pool of [S, K, D] blocks passes 2**31
elements when many sequences share it). Softmax runs in fp32 in the exp2 domain; P is cast to
the kv dtype for P @ V, as in any flash kernel (the torch reference rounds P the same way, only
after normalisation, so bf16 results differ by ~1e-3 relative). fp32 inputs use IEEE dots.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention_decode_merge import _decode_merge_kernel, arrivals, fused_merge_splits, merge_if_last, slice_len
from .attention_decode_merge import warm_decode_merge as _warm_decode_merge
from .pdl import launch_args, pdl_enter, pdl_release

_LOG2E = 1.4426950408889634
DECODE_BLOCK_N = 128  # keys per step of the decode split kernel, and the granularity of its slices
# ... and at most this many (sequence, kv head) pairs take 64-key steps: a batch-1 or -2 step's
# slices are short, and a 64-key tile halves a program's first load (bench/bench_decode_layer.py
# at b1 and b16 times both)
DECODE_SMALL_PAIRS = 8
# From this many pairs (256 sequences of 4 kv heads) every program holds a whole short context:
# 64-key steps two deep, so that more programs share an SM and overlap their first loads
# (bench/bench_attention.py --only decode --sweep times the other settings)
DECODE_MANY_PAIRS = 1024


def decode_launch(batch: int, kv_heads: int) -> tuple[int, int, int]:
    """(keys per step, warps, stages) of the split kernel for this many (sequence, kv head) pairs."""
    pairs = batch * kv_heads
    if pairs <= DECODE_SMALL_PAIRS:
        return 64, 4, 3
    if pairs >= DECODE_MANY_PAIRS:
        return 64, 4, 2
    return DECODE_BLOCK_N, 4, 3


def decode_block_n(batch: int, kv_heads: int) -> int:
    """Keys per step of the split kernel for this many (sequence, kv head) pairs."""
    return decode_launch(batch, kv_heads)[0]


@triton.jit
def kv_offsets(page, offs_n, S: tl.constexpr, kh, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk):
    """Element offsets (int64, [BLOCK_N]) of key positions offs_n of kv head kh in the K and V pools,
    given each position's block id `page` (int64): slot = pos % S within the block."""
    slot = (offs_n % S).to(tl.int64)
    return (page * stride_kp + slot * stride_ks + kh * stride_kk,
            page * stride_vp + slot * stride_vs + kh * stride_vk)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # TRITON_INTERPRET: its numpy dot reads bf16 as raw uint16, so go through fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, kh, n0, end, qpos, qk_scale,
                 stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                 S: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASK_END: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N) of one sequence and kv head kh.

    q [R, D]; (m_i, l_i, acc) [R], [R], [R, D] fp32, m_i in log2 units. MASK_END: keys >= end
    are dropped (and not loaded); CAUSAL: keys past each row's position qpos [R] are dropped.
    K/V rows are gathered token by token: page = table[pos // S], slot = pos % S (int64).
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_n = offs_n < end
    if MASK_END:
        page = tl.load(bt_row + offs_n // S, mask=mask_n, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + offs_n // S).to(tl.int64)
    k_off, v_off = kv_offsets(page, offs_n, S, kh, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk)
    if MASK_END:
        kT = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=mask_n[None, :], other=0.0)
    else:
        kT = tl.load(k_ptr + k_off[None, :] + offs_d[:, None])  # [D, BLOCK_N]
    qk = _dot(q, kT, PRECISION, UPCAST) * qk_scale  # [R, BLOCK_N]
    if CAUSAL:
        qk = tl.where((offs_n[None, :] <= qpos[:, None]) & mask_n[None, :], qk, float("-inf"))
    elif MASK_END:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # m_i starts at -1e30 (finite): never inf - inf
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK_END:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    else:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :])  # [BLOCK_N, D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------- decode


# per-step integers (block-table width, split count) are not specialized: Triton would compile a
# variant per class (== 1, divisible by 16, other) and combination, inside requests
@triton.jit(do_not_specialize=["stride_btb", "num_splits"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, o_part_ptr, lse_part_ptr, o_ptr, arrive_ptr,
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qn,
    stride_kp, stride_ks, stride_kk,
    stride_vp, stride_vs, stride_vk,
    stride_btb, stride_ob, stride_on,
    num_splits,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    DIRECT: tl.constexpr, FUSED: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr,
):
    """DIRECT (num_splits == 1): each program holds its sequence's whole context and writes the
    final output rows o [B, N, D] in o's dtype (no partials, no merge launch). FUSED (num_splits <=
    SP): the last program of each (sequence, kv head) merges the partials (merge_if_last; GP: G's
    power of two). A sequence whose context fits one slice (slice_len) has its output written by
    that slice's program in every mode."""
    pdl_release(PDL)  # the merge, then o_proj's weight stream, may start beside this kernel
    pdl_enter(PDL)
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)  # query heads of this group, padded to >= 16 rows for tl.dot
    offs_d = tl.arange(0, D)
    mask_g = offs_g < G
    heads = kh * G + offs_g
    o_rows = o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_on + offs_d[None, :]
    # Each sequence spreads its own context over the splits in BLOCK_N-aligned slices; a short one
    # fills only the first few, and the rest stop here (the merge reads only the filled ones).
    per_split = slice_len(ctx, num_splits, BLOCK_N)
    start = split * per_split
    if start >= ctx:
        if DIRECT or FUSED:
            if split == 0:  # no keys at all (ctx 0): zeros, as the merge writes
                tl.store(o_rows, tl.zeros([BLOCK_G, D], tl.float32).to(o_ptr.dtype.element_ty), mask=mask_g[:, None])
        return
    end = tl.minimum(start + per_split, ctx)

    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qn + offs_d[None, :],
                mask=mask_g[:, None], other=0.0)  # [BLOCK_G, D]

    m_i = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: a fully masked tile cannot make NaN
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    kh64 = kh.to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, kh64, n0, end, offs_g, qk_scale,
            stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
            S, D, BLOCK_N, True, False, PRECISION, UPCAST)

    # Partial result normalised by its own sum (l > 0: the slice holds at least one key).
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DIRECT:
        tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=mask_g[:, None])
        return
    used = tl.cdiv(ctx, per_split)
    if used == 1:  # the whole context in this program: no partials (the merge skips the sequence)
        tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=mask_g[:, None])
        return
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # log2 units
    row = (b * tl.num_programs(1) * G + heads).to(tl.int64) * num_splits + split  # [B, N, splits]
    tl.store(o_part_ptr + row[:, None] * D + offs_d[None, :], o, mask=mask_g[:, None])
    tl.store(lse_part_ptr + row, lse, mask=mask_g)
    if FUSED:
        merge_if_last(o_part_ptr, lse_part_ptr, arrive_ptr, o_ptr, b, kh, used, num_splits,
                      stride_ob, stride_on, G, GP, SP, D)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device,
                      min_tokens_per_split: int = 128, max_splits: int = 128) -> int:
    """Splits of each (sequence, kv head)'s keys, for about 4 programs per SM when there are at most
    8 (sequence, kv head) pairs (batch 1-2: the merge is cheap beside the latency of few long
    programs) and about 2 per SM above that (each program then streams a longer slice, fewer partial
    results to merge); slices of at least min_tokens_per_split keys (bench/bench_attention.py
    --sweep --only decode times other counts).

    B=1, K=4, 90k context on 132 SMs: 128 splits of 720 tokens; B=16: 4 splits.
    """
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    pairs = max(1, batch * kv_heads)
    want = max(1, (4 if pairs <= 8 else 2) * sms // pairs)
    cap = max(1, triton.cdiv(max(1, max_context), min_tokens_per_split))
    return max(1, min(want, cap, max_splits))


def warm_decode_merge(num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """The separate merge kernel at every split count and both key steps (decode_block_n)."""
    _warm_decode_merge(num_heads, head_dim, dtype, device, tuple(sorted({decode_block_n(1, 1), DECODE_BLOCK_N})))


def warm_decode_split(num_heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> None:
    """Compile the split kernel at each of decode_launch's settings, direct (one split), with the
    fused merge (2 splits) and with partials for the merge kernel (past fused_merge_splits): a
    decode step outside the CUDA graphs (eager) can take any of them, by its batch and its context."""
    cache = torch.zeros(1, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    q = torch.zeros(1, num_heads, head_dim, device=device, dtype=dtype)
    table = torch.zeros(1, 1, device=device, dtype=torch.int32)
    ctx = torch.ones(1, device=device, dtype=torch.int32)
    for block_n, warps, stages in {decode_launch(b, 1) for b in (1, DECODE_SMALL_PAIRS + 1, DECODE_MANY_PAIRS)}:
        for splits in (1, 2, 2 * fused_merge_splits(num_heads // kv_heads)):
            paged_decode(q, cache, cache, table, ctx, 1.0, max_context=1, num_splits=splits, block_n=block_n,
                         launch=(warps, stages))


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    N, D = q.shape[1], q.shape[2]
    P, S, K, Dk = k_cache.shape
    assert v_cache.shape == k_cache.shape and Dk == D, (q.shape, k_cache.shape, v_cache.shape)
    assert N % K == 0, f"query heads {N} not a multiple of kv heads {K}"
    assert D >= 16 and D & (D - 1) == 0, f"head_dim {D} must be a power of two >= 16"
    assert S & (S - 1) == 0, f"block size {S} must be a power of two"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, \
        "last dim (head_dim) must be contiguous"
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    return N, K, D


def _interpreted() -> bool:
    """Kernels were decorated under TRITON_INTERPRET=1 (CPU tests)."""
    return not isinstance(_decode_split_kernel, triton.runtime.jit.JITFunction)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def paged_decode(q_BND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables_BM: torch.Tensor, context_lens_B: torch.Tensor, scale: float,
                 max_context: int | None = None, num_splits: int | None = None,
                 out: torch.Tensor | None = None, block_n: int | None = None,
                 launch: tuple[int, int] | None = None) -> torch.Tensor:
    """One query per sequence: o[b] = softmax(q[b] k[:ctx_b]^T * scale) v[:ctx_b], GQA.

    q_BND [B, N, D]; caches [P, S, K, D]; block_tables_BM int32 [B, M]; context_lens_B int32 [B]
    (>= 1, includes the token of q). max_context (host int, an upper bound of context_lens) only
    picks num_splits; without both, the pool size P * S is used as the bound. block_n: keys per
    step and launch, the split kernel's (num_warps, num_stages): by default decode_launch's.
    """
    B = q_BND.shape[0]
    N, K, D = _check_cache(q_BND, k_cache, v_cache)
    G = N // K
    assert block_tables_BM.dtype == torch.int32 and context_lens_B.dtype == torch.int32
    assert block_tables_BM.stride(-1) == 1
    auto_n, warps, stages = decode_launch(B, K)
    block_n = block_n or auto_n
    launch = launch or (warps, stages)
    if num_splits is None:
        bound = max_context if max_context is not None else k_cache.shape[0] * k_cache.shape[1]
        num_splits = choose_num_splits(B, K, bound, q_BND.device)
    if out is None:
        out = torch.empty_like(q_BND, memory_format=torch.contiguous_format)
    assert out.shape == q_BND.shape and out.stride(-1) == 1
    if B == 0:
        return out
    direct = num_splits == 1  # one slice a sequence: the split kernel writes out itself
    fused = not direct and num_splits <= fused_merge_splits(G)  # its last program merges
    if direct:  # no partials: the kernel's partial pointers are never read or written
        o_part = lse_part = out
    else:
        o_part = torch.empty(B, N, num_splits, D, device=q_BND.device, dtype=torch.float32)
        lse_part = torch.empty(B, N, num_splits, device=q_BND.device, dtype=torch.float32)
    arrive = arrivals(q_BND.device, B * K) if fused else context_lens_B  # (unused unless fused)
    _decode_split_kernel[(B, K, num_splits)](
        q_BND, k_cache, v_cache, block_tables_BM, context_lens_B, o_part, lse_part, out, arrive,
        scale * _LOG2E,
        q_BND.stride(0), q_BND.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables_BM.stride(0), out.stride(0), out.stride(1),
        num_splits,
        G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, S=k_cache.shape[1],
        BLOCK_N=block_n, PRECISION=_precision(q_BND.dtype), UPCAST=_interpreted(),
        DIRECT=direct, FUSED=fused, GP=triton.next_power_of_2(G), SP=fused_merge_splits(G),
        num_warps=launch[0], num_stages=launch[1], **launch_args(q_BND.device),
    )
    if direct or fused:
        return out
    _decode_merge_kernel[(B, N)](
        o_part, lse_part, context_lens_B, out, out.stride(0), out.stride(1), num_splits,
        N=N, D=D, BLOCK_N=block_n, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        num_warps=8 if num_splits > 32 else 4, **launch_args(q_BND.device),
    )
    return out
