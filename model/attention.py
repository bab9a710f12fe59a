"""Paged attention, torch reference path (any device): KV writes through slot mappings and
causal attention of a flat token batch over per-sequence block tables.

Letters: T tokens in the micro-batch, B sequences, N query heads, K kv heads, D head_dim,
P blocks in the pool, S block size, M max blocks per sequence.
"""
from __future__ import annotations

import torch


def write_kv(k_cache_PSKD: torch.Tensor, v_cache_PSKD: torch.Tensor, k_TKD: torch.Tensor,
             v_TKD: torch.Tensor, slot_mapping_T: torch.Tensor) -> None:
    """Store each token's k/v at slot = block_id * S + offset (slot < 0 means: do not store)."""
    P, S, K, D = k_cache_PSKD.shape
    k_flat, v_flat = k_cache_PSKD.view(P * S, K, D), v_cache_PSKD.view(P * S, K, D)
    k_flat.index_copy_(0, slot_mapping_T, k_TKD.to(k_flat.dtype))
    v_flat.index_copy_(0, slot_mapping_T, v_TKD.to(v_flat.dtype))


def gather_kv(cache_PSKD: torch.Tensor, block_table_M: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, contiguous: [length, K, D]."""
    P, S, K, D = cache_PSKD.shape
    nblocks = (length + S - 1) // S
    return cache_PSKD[block_table_M[:nblocks].long()].reshape(nblocks * S, K, D)[:length]


def attention_ref(q_TND: torch.Tensor, k_cache_PSKD: torch.Tensor, v_cache_PSKD: torch.Tensor,
                  block_tables_BM: torch.Tensor, query_lens: list[int], context_lens: list[int],
                  scale: float) -> torch.Tensor:
    """Causal GQA attention for a flat batch of chunks, matching HF eager maths.

    Sequence b owns query rows [sum(query_lens[:b]), +query_lens[b]); its cache already holds
    context_lens[b] tokens, the last query_lens[b] of which are this chunk. Query i of the chunk
    sits at position context_lens[b] - query_lens[b] + i and sees kv positions <= its own.
    Softmax in fp32, probabilities cast back to the input dtype before P @ V (as HF eager).
    Returns [T, N, D] in q's dtype.
    """
    T, N, D = q_TND.shape
    K = k_cache_PSKD.shape[2]
    group = N // K
    out = torch.empty_like(q_TND)
    start = 0
    for b, (qlen, ctx) in enumerate(zip(query_lens, context_lens)):
        q = q_TND[start:start + qlen].transpose(0, 1)  # [N, q, D]
        k = gather_kv(k_cache_PSKD, block_tables_BM[b], ctx).to(q.dtype)
        v = gather_kv(v_cache_PSKD, block_tables_BM[b], ctx).to(q.dtype)
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [N, ctx, D]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [N, q, ctx]
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[start:start + qlen] = torch.matmul(probs, v).transpose(0, 1)
        start += qlen
    return out
