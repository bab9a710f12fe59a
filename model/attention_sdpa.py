"""Prefill over the paged cache through torch's fused SDPA (flash on CUDA): each sequence's cached
K/V is gathered contiguous and attended with a lower-right causal mask, so a chunk that starts deep
in the context sees its whole prefix. Rows with a single query go to a paged decode function."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .attention import gather_kv
from .batch import AttnBatch


def _heads(kv_ctxKD: torch.Tensor, q_1NqD: torch.Tensor) -> torch.Tensor:
    """[ctx, K, D] -> [1, K, ctx, D]; SDPA's enable_gqa maps query head h to kv head h // (N/K).
    (Repeating the kv heads up to N so that the lower-right mask could take the flash kernel costs
    a copy of the prefix per query head; bench/bench_attention.py times the alternatives.)"""
    return kv_ctxKD.to(q_1NqD.dtype).transpose(0, 1)[None]


def per_chunk(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttnBatch, scale: float,
              decode: Callable, attend: Callable) -> torch.Tensor:
    """attend(q [ql, N, D], k [ctx, K, D], v [ctx, K, D]) -> [ql, N, D] on each chunk of two or more
    queries, its K/V gathered contiguous from the pool (in q's dtype); decode(q_BND, k_cache,
    v_cache, block_tables, context_lens_t, scale, max_context) on the single-query rows (decodes mixed
    into a prefill micro-batch) in one call."""
    out = torch.empty_like(q_TND)
    start = 0
    for b, (ql, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if ql > 1:
            k, v = (gather_kv(c, batch.block_tables[b], ctx).to(q_TND.dtype) for c in (k_cache, v_cache))
            out[start:start + ql] = attend(q_TND[start:start + ql], k, v)
        start += ql
    s = batch.single_rows()
    if s is not None:
        out[s.rows] = decode(q_TND[s.rows], k_cache, v_cache, s.block_tables, s.context_lens_t, scale, s.max_context)
    return out


def prefill_sdpa(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttnBatch,
                 scale: float, decode: Callable) -> torch.Tensor:
    """Each chunk through SDPA with a lower-right causal mask (per_chunk); decode: as per_chunk's."""
    def attend(q_QND, k_ctxKD, v_ctxKD):
        ql, ctx = q_QND.shape[0], k_ctxKD.shape[0]
        q = q_QND.transpose(0, 1)[None]  # [1, N, ql, D]
        k, v = _heads(k_ctxKD, q), _heads(v_ctxKD, q)
        mask = None if ql == ctx else causal_lower_right(ql, ctx)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=ql == ctx, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)
    return per_chunk(q_TND, k_cache, v_cache, batch, scale, decode, attend)
