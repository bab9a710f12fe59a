"""Paged prefill attention, Triton, FlashAttention-2 style: the CUDA prefill path for the maths of
attention.attention_ref.

Letters: T tokens in the micro-batch, B sequences, N query heads, K kv heads (G = N // K query
heads per kv head), D head_dim (padded to DP, a power of two), P blocks in the pool, S block size.

Grid (query tiles, K, B). One program owns QM = BLOCK_M // G consecutive queries of one sequence
and all G query heads of one kv head, packed into the BLOCK_M rows of its tile (row r = query
r // G, head r % G), so each K/V tile loaded serves the whole group. Keys are read straight from
the pool through the block table (page = table[pos // S], slot = pos % S): a K tile may span
several blocks (S < BLOCK_N) or lie inside one (S >= BLOCK_N, one table read per tile). Online
softmax in fp32 (exp2 domain); P is cast to the kv dtype for P @ V; output in q's dtype.

Causality: query i of a chunk of length qlen sits at position ctx - qlen + i. A program's keys
split in two loops: tiles below its first query's position, visible to every row (no mask), then
the one or two tiles on the diagonal (masked). Tiles above the diagonal are never visited.
No buffer depends on the prefix length: the kernel reads the pool and writes `out` only.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention_triton import kv_offsets

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (fp32)."""
    if UPCAST:  # TRITON_INTERPRET: its numpy dot reads bf16 as raw uint16, so go through fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, kh, n0, hi, qpos, offs_d, mask_d, qk_scale,
          stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
          S: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
          MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N) (n0 a multiple of BLOCK_N).

    q [BLOCK_M, DP]; m_i, l_i [BLOCK_M] (m_i in log2 units), acc [BLOCK_M, DP] fp32. MASKED (the
    diagonal tiles): keys past each row's position qpos [BLOCK_M], or at/after hi, are dropped
    and not loaded. Key rows: page = table[pos // S], slot = pos % S, int64 element offsets.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if S >= BLOCK_N:  # the tile lies inside one block: one table read
        page = tl.load(bt_row + n0 // S).to(tl.int64)
    elif MASKED:
        page = tl.load(bt_row + offs_n // S, mask=offs_n < hi, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + offs_n // S).to(tl.int64)
    k_off, v_off = kv_offsets(page, offs_n, S, kh, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk)
    if MASKED:
        mask_kv = (offs_n < hi)[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=mask_kv, other=0.0)
    elif D != DP:
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
    else:
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :])  # [BLOCK_N, DP]
    qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), PRECISION, UPCAST)
    if MASKED:
        qk = tl.where((offs_n[None, :] <= qpos[:, None]) & (offs_n < hi)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # m_i starts at -1e30: never inf - inf
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=mask_kv, other=0.0)
    elif D != DP:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
    else:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :])  # [BLOCK_N, DP]
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _rows(qstart_ptr, b, kh, G: tl.constexpr, BLOCK_M: tl.constexpr, SKIP_SINGLE: tl.constexpr):
    """The rows of program (query tile program_id(0), kv head kh, sequence b): row r of the tile is
    query qi[r] (of the chunk; token rows[r] of q) and head heads[r]; mask_m: real rows. Also the
    chunk's length and the tile's first query mq0 (the last, longest tiles start first). idle: the
    program has nothing to do (past the chunk's tiles, or with SKIP_SINGLE a one-query row, which
    the split-K decode kernel owns); its mask_m is all false."""
    QM: tl.constexpr = BLOCK_M // G
    q0 = tl.load(qstart_ptr + b)
    qlen = tl.load(qstart_ptr + b + 1) - q0
    n_tiles = tl.cdiv(qlen, QM)
    idle = tl.program_id(0) >= n_tiles
    if SKIP_SINGLE:
        idle = idle | (qlen == 1)
    mq0 = (n_tiles - 1 - tl.program_id(0)) * QM
    r = tl.arange(0, BLOCK_M)
    qi = mq0 + r // G
    mask_m = (r < tl.where(idle, 0, QM * G)) & (qi < qlen) & (qi >= 0)
    return qlen, mq0, qi, kh * G + r % G, mask_m, (q0 + qi).to(tl.int64), idle


@triton.jit
def _tile_start(q_ptr, ctx_ptr, bt_ptr, qstart_ptr, b, kh, stride_qt, stride_qn, stride_btb, G: tl.constexpr,
                D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SKIP_SINGLE: tl.constexpr):
    """A program's start: its rows (_rows; idle: return at once), its q tile [BLOCK_M, DP] (zero
    past D and on padding rows), each row's position qpos, the empty online-softmax state (m in log2
    units, l, acc), the block-table row of sequence b, kh as int64, the head-dim offsets and mask,
    and the key ranges: keys < full are visible to every row (full a multiple of BLOCK_N), hi is one
    past the tile's last visible key."""
    QM: tl.constexpr = BLOCK_M // G
    qlen, mq0, qi, heads, mask_m, rows, idle = _rows(qstart_ptr, b, kh, G, BLOCK_M, SKIP_SINGLE)
    pos0 = tl.load(ctx_ptr + b) - qlen  # position of the chunk's first query
    offs_d = tl.arange(0, DP)
    mask_d = offs_d < D
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    full = ((pos0 + mq0 + 1) // BLOCK_N) * BLOCK_N
    hi = pos0 + tl.minimum(mq0 + QM, qlen)
    return (idle, rows, heads, mask_m, offs_d, mask_d, q, pos0 + qi, m_i, l_i, acc,
            bt_ptr + b.to(tl.int64) * stride_btb, kh.to(tl.int64), full, hi)


@triton.jit
def _prefill_fa_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, qstart_ptr, ctx_ptr,
    qk_scale,  # scale * log2(e)
    stride_qt, stride_qn, stride_ot, stride_on,
    stride_kp, stride_ks, stride_kk,
    stride_vp, stride_vs, stride_vk,
    stride_btb,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_SINGLE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(2)
    idle, rows, heads, mask_m, offs_d, mask_d, q, qpos, m_i, l_i, acc, bt_row, kh64, full, hi = _tile_start(
        q_ptr, ctx_ptr, bt_ptr, qstart_ptr, b, tl.program_id(1), stride_qt, stride_qn, stride_btb, G, D, DP,
        BLOCK_M, BLOCK_N, SKIP_SINGLE)
    if idle:
        return
    for n0 in range(0, full, BLOCK_N):
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, kh64, n0, hi, qpos, offs_d,
                              mask_d, qk_scale, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs,
                              stride_vk, S, D, DP, BLOCK_N, False, PRECISION, UPCAST)
    for n0 in range(full, hi, BLOCK_N):
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, kh64, n0, hi, qpos, offs_d,
                              mask_d, qk_scale, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs,
                              stride_vk, S, D, DP, BLOCK_N, True, PRECISION, UPCAST)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # stored rows saw key 0 at least: l_i > 0
    tl.store(o_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_on + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _interpreted() -> bool:
    """The kernel was decorated under TRITON_INTERPRET=1 (CPU tests)."""
    return not isinstance(_prefill_fa_kernel, triton.runtime.jit.JITFunction)


# bf16/fp16, head_dim > 64, sm_90: the two fastest tiles of bench_attention.py --sweep, and their
# relative rates (TFLOP/s), which choose_tiles weighs against the idle share of the last wave
# (BENCHMARKS.md has the sweep). Larger tiles (M256 N128) spill registers.
TILES_BIG = dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=3)
TILES_MID = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
TFLOPS_BIG, TFLOPS_MID = 428.0, 396.0


def choose_tiles(max_query_len: int, group: int, kv_heads: int, batch: int, sms: int) -> dict:
    """TILES_BIG unless its fewer, larger programs leave more of the last wave idle: modeled time
    = waves * rows per program / measured rate (one program per SM for both)."""
    def cost(tiles: dict, rate: float) -> float:
        programs = -(-max_query_len // (tiles["BLOCK_M"] // group)) * kv_heads * batch
        return -(-programs // sms) * tiles["BLOCK_M"] / rate
    return dict(TILES_BIG if cost(TILES_BIG, TFLOPS_BIG) <= cost(TILES_MID, TFLOPS_MID) else TILES_MID)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(dtype: torch.dtype, head_dim: int, max_query_len: int = 0, group: int = 1,
                   kv_heads: int = 1, batch: int = 1, device: torch.device | None = None,
                   sms: int | None = None) -> dict:
    """sms: the device's SM count (default: read from a CUDA device; none: the CPU choice)."""
    if dtype == torch.float32:  # twice the bytes per tile: smaller tiles to fit shared memory
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if sms is None and device is not None and device.type == "cuda":
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if sms is None or group > TILES_BIG["BLOCK_M"] // 2:
        return dict(TILES_MID)
    return choose_tiles(max_query_len, group, kv_heads, batch, sms)


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    N, D = q.shape[1], q.shape[2]
    P, S, K, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape or Dk != D:
        raise ValueError(f"q {tuple(q.shape)}, k cache {tuple(k_cache.shape)}, v cache {tuple(v_cache.shape)}: "
                         f"caches must match and share q's head_dim")
    if N % K:
        raise ValueError(f"query heads {N} not a multiple of kv heads {K}")
    if S & (S - 1):
        raise ValueError(f"block size {S} must be a power of two")
    if not (q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1):
        raise ValueError("last dim (head_dim) of q and the caches must be contiguous")
    if not (k_cache.dtype == v_cache.dtype == q.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    return N, K, D


def paged_prefill_fa(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables_BM: torch.Tensor, query_start_B1: torch.Tensor,
                     context_lens_B: torch.Tensor, scale: float, max_query_len: int,
                     out: torch.Tensor | None = None, config: dict | None = None,
                     skip_single: bool = False) -> torch.Tensor:
    """Causal attention of a flat batch of chunks over their paged caches (chunks already written).

    q_TND [T, N, D]; caches [P, S, K, D]; block_tables_BM int32 [B, M]; query_start_B1 int32
    [B + 1] (sequence b owns rows [qs[b], qs[b+1])); context_lens_B int32 [B] (>= that sequence's
    query length); max_query_len host int >= every query length (sizes the grid). skip_single:
    leave the rows of single-query sequences unwritten (the caller's decode kernel does them).
    Rows of T not owned by a sequence are left untouched.
    """
    T = q_TND.shape[0]
    N, K, D = check_inputs(q_TND, k_cache, v_cache)
    G = N // K
    B = context_lens_B.shape[0]
    assert query_start_B1.shape[0] == B + 1
    assert block_tables_BM.dtype == context_lens_B.dtype == query_start_B1.dtype == torch.int32
    assert block_tables_BM.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q_TND, memory_format=torch.contiguous_format)
    assert out.shape == q_TND.shape and out.stride(-1) == 1
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    cfg = dict(default_config(q_TND.dtype, D, max_query_len, G, K, B, q_TND.device), **(config or {}))
    block_m = cfg["BLOCK_M"]
    if G > block_m:
        block_m = cfg["BLOCK_M"] = triton.next_power_of_2(G)
    grid = (triton.cdiv(max_query_len, block_m // G), K, B)
    _prefill_fa_kernel[grid](
        q_TND, k_cache, v_cache, out, block_tables_BM, query_start_B1, context_lens_B,
        scale * _LOG2E,
        q_TND.stride(0), q_TND.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables_BM.stride(0),
        G=G, D=D, DP=max(16, triton.next_power_of_2(D)), S=k_cache.shape[1],
        SKIP_SINGLE=skip_single, PRECISION="ieee" if q_TND.dtype == torch.float32 else "tf32",
        UPCAST=_interpreted(), **cfg,
    )
    return out


# ---- warm-up: the variants this kernel compiles ------------------------------------------------
def stride_class(n: int) -> str:
    """How Triton specializes an int argument: 'one', 'div16' (multiple of 16) or 'other'."""
    return "one" if n == 1 else "div16" if n % 16 == 0 else "other"


def launch_variant(dtype: torch.dtype, head_dim: int, group: int, kv_heads: int, query_lens: list[int],
                   context_lens: list[int], block_size: int, sms: int | None) -> tuple | None:
    """What selects a separately compiled _prefill_fa_kernel for one micro-batch through
    prefill_attend (None: it does not launch the kernel): the tile config (default_config, from the
    longest query, the group, kv heads and sequences), SKIP_SINGLE (some row decodes) and the class
    of the block-table row stride M (the longest context's block count). Strides of q, out and the
    pool are the model's own, the same in every step. On sm_90 a chunk that attention_prefill_fa3
    splits runs that module's kernel instead (its int arguments unspecialized; warm_shapes' short
    chunks deep in a context compile it): counting it here only asks for more warm-up."""
    if max(query_lens) == 1:
        return None
    cfg = default_config(dtype, head_dim, max(query_lens), group, kv_heads, len(query_lens), sms=sms)
    M = max(1, max(-(-c // block_size) for c in context_lens))
    return tuple(sorted(cfg.items())), any(q == 1 for q in query_lens), stride_class(M)


def warm_classes(dtype: torch.dtype, head_dim: int, group: int, kv_heads: int, max_tokens: int, max_batch: int,
                 max_context: int, block_size: int, sms: int | None) -> list[tuple[list[int], list[int]]]:
    """Micro-batches (query_lens, context_lens) that between them launch every variant of
    launch_variant the engine can reach within max_tokens per step, max_batch sequences and
    max_context: one chunk behind a cached prefix (the 'auto' backend sends those here), alone or
    beside decode rows (1, 2, 4, 16, 64 sequences and max_batch: the tile choice weighs the rows),
    at each tile config its length can select, with each block-table width class its context can
    have (M == 1 only below one block)."""
    S = block_size
    found: dict[tuple, tuple[list[int], list[int]]] = {}
    for B in sorted({1, 2, 4, 16, 64, max_batch} & set(range(1, max_batch + 1))):
        for T in range(2, max_tokens - (B - 1) + 1):
            cfg = tuple(sorted(default_config(dtype, head_dim, T, group, kv_heads, B, sms=sms).items()))
            m = -(-(T + 1) // S)  # the fewest blocks of a context with a cached prefix
            for ctx in (T + 1, -(-m // 16) * 16 * S, (m + 1 if m % 16 == 0 or m == 1 else m) * S):
                cls = stride_class(-(-ctx // S))
                key = (cfg, B > 1, cls)
                if ctx <= max_context and key not in found:
                    found[key] = ([T] + [1] * (B - 1), [ctx] + [min(ctx, S)] * (B - 1))
    return list(found.values())
