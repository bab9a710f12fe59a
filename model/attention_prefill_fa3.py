"""Paged causal prefill attention for Hopper (sm_90), FlashAttention-3 style, Triton: the maths of
attention.attention_ref behind the interface of attention_prefill_triton.paged_prefill_fa.

Letters as there: T tokens, B sequences, N query heads, K kv heads (G = N // K), D head_dim,
P blocks in the pool, S block size.

Grid (query tiles, K * splits, B). A program owns QM = BLOCK_M // G consecutive queries of one
sequence and all G query heads of one kv head, packed into the BLOCK_M rows of its tile (row r =
query r // G, head r % G), so one K/V tile serves the whole group.

- TMA (S >= BLOCK_N, D a power of two): K/V tiles come through tensor descriptors over the pool seen
  as a [P * S, K * D] matrix; a tile lies inside one block, so its row is table[n0 // S] * S + n0 % S
  and its column kh * D (the block table is read in place, one entry per tile). The unmasked loop is
  software-pipelined over num_stages TMA buffers (wgmma on one tile while the next ones load), and
  with WS a `tl.range(..., warp_specialize=True)`: a producer warp issues the loads, the consumer
  warps run the two wgmma and the softmax. Otherwise (S < BLOCK_N) the tile rows are gathered with
  pointer loads (attention_prefill_triton._tile).
- Split-KV (splits > 1, for short chunks deep in a context, whose grid underfills the SMs): split s
  of a program takes a contiguous share of its unmasked key tiles (the last split also the diagonal)
  and writes its unnormalised partial (acc, m, l) to fp32 workspaces [splits, T, N, (D)]; a merge
  kernel over the same grid combines them (flash-decoding). A split with no tiles writes m = -1e30,
  l = 0, acc = 0, which the merge weighs 0.

Causality as in attention_prefill_triton: keys below the first query of the tile are visible to
every row (unmasked loop); the one or two tiles on the diagonal are masked; keys above are never
read. Masked tiles zero the V rows past the context, so stale (even NaN) slots never reach P @ V.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_prefill_triton import (_LOG2E, _dot, _interpreted, _num_sms, _rows, _tile, _tile_start, check_inputs,
                                       paged_prefill_fa)
from .tma import use_descriptors

# bf16/fp16, D 128, sm_90: the fastest TMA tiles of bench_attention.py --sweep (warp
# specialisation, WS, times the same there, so the plain pipelined loop is the default). Gathered
# tiles (S < BLOCK_N) run only split (unsplit, attention_prefill_triton's kernel is as fast), with
# that kernel's big tiles. Each config is a compiled variant the warm-up must cover.
# LAZY (the conditional rescale of _tile_tma) on for TMA tiles: a tile whose row maxima stay
# within LAZY_TAU of the running max skips the acc rescale, which the sweep times faster at every
# TMA tile (`bench_attention.py --sweep`, rows with and without "lazy").
TILES_TMA = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, WS=False, LAZY=True)
TILES_GATHER = dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=3, WS=False,  # = its TILES_BIG
                    LAZY=False)
TILES_FP32 = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, WS=False,  # 2x bytes per tile
                  LAZY=False)
MAX_SPLITS = 16
LAZY_TAU = tl.constexpr(8.0)  # LAZY: stale max kept while s - m <= 8 (P <= 256)
MIN_SPLIT_KEYS = 2048  # keys per split at least: below it the merge and the diagonal dominate


@triton.jit
def _tile_tma(q, m_i, l_i, acc, k_desc, v_desc, bt_row, col, n0, hi, qpos, qk_scale,
              S: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, LAZY: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N), a tile inside one block (S >= BLOCK_N):
    K, V [BLOCK_N, D] by TMA at pool row table[n0 // S] * S + n0 % S, column col = kh * D.
    q [BLOCK_M, D]; m_i (log2 units), l_i [BLOCK_M]; acc [BLOCK_M, D] fp32.

    LAZY (unmasked tiles only; FlashAttention-4's conditional rescale): m_i is a reference max, not
    the running one. It moves (and acc, l_i are rescaled) only when some row's tile max exceeds it
    by more than LAZY_TAU, one scalar branch per tile; otherwise P = 2^(s - m_i) against the stale
    m_i. Invariant after every tile: s - m_i <= LAZY_TAU for every score seen, so P <= 2^LAZY_TAU
    (no fp32 overflow, bf16 P keeps its relative precision), and acc, l_i share the reference m_i,
    so acc / l_i and the split merge (which weighs (acc, l) by 2^m) stay exact. Unmasked scores
    are finite (keys < full are in every row's context; padding rows have q = 0), so no inf - inf;
    the first tile always moves m_i off its -1e30 start."""
    page = tl.load(bt_row + n0 // S)
    row = page * S + n0 % S
    k = k_desc.load([row, col])
    qk = _dot(q, k.T, tl.zeros([q.shape[0], BLOCK_N], tl.float32), PRECISION, UPCAST)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        qk = tl.where((offs_n[None, :] <= qpos[:, None]) & (offs_n < hi)[None, :], qk, float("-inf"))
    if LAZY:  # (callers pass it for unmasked tiles only)
        m_tile = tl.max(qk, 1) * qk_scale
        if tl.max(m_tile - m_i, 0) > LAZY_TAU:  # tile-uniform: every row keeps or moves together
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(qk * qk_scale - m_i[:, None])
        v = v_desc.load([row, col])
        acc = _dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
        l_i = l_i + tl.sum(p, 1)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # m_i starts at -1e30: never inf - inf
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = v_desc.load([row, col])
        if MASKED:
            v = tl.where((offs_n < hi)[:, None], v, 0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i, l_i = m_new, l_i * alpha + tl.sum(p, 1)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["T", "num_splits", "stride_btb"])  # (warm-up covers fewer classes)
def _fa3_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, wo_ptr, wml_ptr, bt_ptr, qstart_ptr, ctx_ptr,
    qk_scale, T, PS, num_splits,
    stride_qt, stride_qn, stride_ot, stride_on,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk, stride_btb,
    N: tl.constexpr, G: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
    LAZY: tl.constexpr, SPLIT: tl.constexpr, SKIP_SINGLE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(2)
    kh = tl.program_id(1) // num_splits
    split = tl.program_id(1) % num_splits
    idle, rows, heads, mask_m, offs_d, mask_d, q, qpos, m_i, l_i, acc, bt_row, kh64, full, hi = _tile_start(
        q_ptr, ctx_ptr, bt_ptr, qstart_ptr, b, kh, stride_qt, stride_qn, stride_btb, G, D, D, BLOCK_M, BLOCK_N,
        SKIP_SINGLE)
    if idle:
        return
    # keys < full are visible to every row; this split's share of them is [lo, mid)
    per = tl.cdiv(full // BLOCK_N, num_splits) * BLOCK_N
    lo = tl.minimum(split * per, full)
    mid = tl.minimum(lo + per, full)
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[PS, N // G * D], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[PS, N // G * D], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, D])
        col = kh * D
        for n0 in tl.range(lo, mid, BLOCK_N, warp_specialize=WS):
            m_i, l_i, acc = _tile_tma(q, m_i, l_i, acc, k_desc, v_desc, bt_row, col, n0, hi, qpos,
                                      qk_scale, S, BLOCK_N, False, LAZY, PRECISION, UPCAST)
        if split == num_splits - 1:
            for n0 in range(full, hi, BLOCK_N):
                m_i, l_i, acc = _tile_tma(q, m_i, l_i, acc, k_desc, v_desc, bt_row, col, n0, hi,
                                          qpos, qk_scale, S, BLOCK_N, True, False, PRECISION, UPCAST)
    else:
        for n0 in range(lo, mid, BLOCK_N):
            m_i, l_i, acc = _tile(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, kh64, n0, hi, qpos, offs_d,
                                  mask_d, qk_scale, stride_kp, stride_ks, stride_kk, stride_vp,
                                  stride_vs, stride_vk, S, D, D, BLOCK_N, False, PRECISION, UPCAST)
        if split == num_splits - 1:
            for n0 in range(full, hi, BLOCK_N):
                m_i, l_i, acc = _tile(q, m_i, l_i, acc, k_ptr, v_ptr, bt_row, kh64, n0, hi, qpos,
                                      offs_d, mask_d, qk_scale, stride_kp, stride_ks, stride_kk,
                                      stride_vp, stride_vs, stride_vk, S, D, D, BLOCK_N, True,
                                      PRECISION, UPCAST)

    if SPLIT:  # partials: acc [splits, T, N, D], (m, l) [splits, T, N, 2], fp32
        wrow = (split * T + rows) * N + heads  # int64 (rows is)
        tl.store(wo_ptr + wrow[:, None] * D + offs_d[None, :], acc, mask=mask_m[:, None])
        tl.store(wml_ptr + wrow * 2, m_i, mask=mask_m)
        tl.store(wml_ptr + wrow * 2 + 1, l_i, mask=mask_m)
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # stored rows saw key 0: l_i > 0
        tl.store(o_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_on + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit(do_not_specialize=["T", "num_splits"])
def _merge_kernel(o_ptr, wo_ptr, wml_ptr, qstart_ptr, T, num_splits, stride_ot, stride_on,
                  N: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  SKIP_SINGLE: tl.constexpr):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits, M = max_s m_s; the
    rows of the main kernel's program with the same (query tile, kv head, sequence)."""
    _, _, _, heads, mask_m, rows, idle = _rows(qstart_ptr, tl.program_id(2), tl.program_id(1), G, BLOCK_M,
                                               SKIP_SINGLE)
    if idle:
        return
    offs_d = tl.arange(0, D)
    m_run = tl.full([BLOCK_M], -1e30, tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for s in range(num_splits):
        wrow = (s * T + rows) * N + heads
        m = tl.load(wml_ptr + wrow * 2, mask=mask_m, other=-1e30)
        l = tl.load(wml_ptr + wrow * 2 + 1, mask=mask_m, other=0.0)
        a = tl.load(wo_ptr + wrow[:, None] * D + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        m_new = tl.maximum(m_run, m)
        c_old, c = tl.exp2(m_run - m_new), tl.exp2(m - m_new)
        acc = acc * c_old[:, None] + a * c[:, None]
        l_run = l_run * c_old + l * c
        m_run = m_new
    o = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_on + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


def choose_kv_splits(programs: int, max_prefix: int, sms: int) -> int:
    """KV splits for a grid of `programs` (query tiles x kv heads x sequences) whose deepest chunk
    sits after `max_prefix` cached keys. A full grid (programs >= sms) is not split. Otherwise the
    modeled time of s splits is waves(s) / s, waves(s) = ceil(programs * s / sms) (one program per
    SM, each split reading 1/s of the keys); the smallest s with the least modeled time wins, at most
    MAX_SPLITS and at most max_prefix // MIN_SPLIT_KEYS (each split keeps enough keys to amortise
    its share of the diagonal tile and the merge)."""
    if programs <= 0 or programs >= sms:
        return 1
    top = max(1, min(MAX_SPLITS, max_prefix // MIN_SPLIT_KEYS))
    return min(range(1, top + 1), key=lambda s: (-(-programs * s // sms) / s, s))


def tma_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> bool:
    """The pool can be read by TMA as a [P * S, K * D] matrix: tiles inside one block, pages
    contiguous rows of that matrix, 16-byte aligned rows and base, D a power of two."""
    P, S, K, D = k_cache.shape
    return (S >= block_n and D & (D - 1) == 0 and D * q.element_size() >= 16
            and all(c.stride() == (S * K * D, K * D, D, 1) and c.data_ptr() % 16 == 0
                    for c in (k_cache, v_cache)))


def paged_prefill_fa3(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables_BM: torch.Tensor, query_start_B1: torch.Tensor,
                      context_lens_B: torch.Tensor, scale: float, max_query_len: int,
                      max_prefix: int = 0, out: torch.Tensor | None = None, config: dict | None = None,
                      num_splits: int | None = None, skip_single: bool = False) -> torch.Tensor:
    """paged_prefill_fa's contract (see there), plus: max_prefix, a host int >= no sequence's
    cached prefix (context - query length), which sizes the KV split; num_splits forces one.
    config: BLOCK_M, BLOCK_N, num_warps, num_stages, WS (warp specialisation, TMA path only), LAZY
    (conditional rescale, see _tile_tma; TMA path only), TMA (False forces the gather path).
    Unsplit gathered tiles without a config take paged_prefill_fa."""
    T = q_TND.shape[0]
    N, K, D = check_inputs(q_TND, k_cache, v_cache)
    G, B = N // K, context_lens_B.shape[0]
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim {D}: the fa3 kernel needs a power of two >= 16")
    assert query_start_B1.shape[0] == B + 1 and block_tables_BM.stride(-1) == 1
    assert block_tables_BM.dtype == context_lens_B.dtype == query_start_B1.dtype == torch.int32
    if out is None:
        out = torch.empty_like(q_TND, memory_format=torch.contiguous_format)
    assert out.shape == q_TND.shape and out.stride(-1) == 1
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    fp32 = q_TND.dtype == torch.float32
    cfg = dict(TILES_FP32 if fp32 else TILES_TMA, **(config or {}))
    tma = cfg.pop("TMA", True) and tma_ok(q_TND, k_cache, v_cache, cfg["BLOCK_N"])
    if not tma and not fp32:
        cfg = dict(TILES_GATHER, **{k: v for k, v in (config or {}).items() if k != "TMA"})
    cfg.pop("TMA", None)
    cfg["WS"] = cfg["WS"] and tma and not _interpreted()
    cfg["LAZY"] = cfg.get("LAZY", False) and tma  # (the gathered tiles have no lazy variant)
    block_m = cfg["BLOCK_M"] = max(cfg["BLOCK_M"], triton.next_power_of_2(G))
    tiles = triton.cdiv(max_query_len, block_m // G)
    if num_splits is None:
        sms = 132 if _interpreted() else _num_sms(q_TND.device.index or 0)
        num_splits = choose_kv_splits(tiles * K * B, max_prefix, sms)
    split = num_splits > 1
    if not tma and not split and config is None:
        return paged_prefill_fa(q_TND, k_cache, v_cache, block_tables_BM, query_start_B1, context_lens_B,
                                scale, max_query_len, out=out, skip_single=skip_single)
    wo = torch.empty((num_splits, T, N, D) if split else (1,), dtype=torch.float32, device=q_TND.device)
    wml = torch.empty((num_splits, T, N, 2) if split else (1,), dtype=torch.float32, device=q_TND.device)
    if tma:
        use_descriptors()
    interp = _interpreted()
    _fa3_kernel[(tiles, K * num_splits, B)](
        q_TND, k_cache, v_cache, out, wo, wml, block_tables_BM, query_start_B1, context_lens_B,
        scale * _LOG2E, T, k_cache.shape[0] * k_cache.shape[1], num_splits,
        q_TND.stride(0), q_TND.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables_BM.stride(0),
        N=N, G=G, D=D, S=k_cache.shape[1], TMA=tma, SPLIT=split, SKIP_SINGLE=skip_single,
        PRECISION="ieee" if fp32 else "tf32", UPCAST=interp, **cfg)
    if split:
        _merge_kernel[(tiles, K, B)](out, wo, wml, query_start_B1, T, num_splits, out.stride(0),
                                     out.stride(1), N=N, G=G, D=D, BLOCK_M=block_m,
                                     SKIP_SINGLE=skip_single, num_warps=4)
    return out
