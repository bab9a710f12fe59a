"""The paged flash-attention path of the engine ('fa'): decode-only micro-batches and the single-query
rows of a mixed one take the split-K decode kernel (attention_triton), chunks the FA2-style paged
kernel (attention_prefill_triton) or, on Hopper, the TMA / split-KV kernel (attention_prefill_fa3).
Letters: T tokens, N query heads, D head_dim."""
from __future__ import annotations

import torch

from .attention_prefill_fa3 import paged_prefill_fa3
from .attention_prefill_triton import paged_prefill_fa
from .attention_triton import paged_decode


def prefill_attend(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch,
                   scale: float, hopper: bool = False) -> torch.Tensor:
    """The engine's attend(q, k_cache, v_cache, AttnBatch, scale) on CUDA: decode-only batches and
    the single-query rows of a mixed batch take the split-K decode kernel, the chunks the FA2-style kernel
    of attention_prefill_triton (hopper: the TMA / split-KV kernel of attention_prefill_fa3)."""
    if batch.max_query_len == 1:
        return paged_decode(q_TND, k_cache, v_cache, batch.block_tables, batch.context_lens_t, scale,
                            batch.max_context)
    single = batch.single_rows()  # built once per micro-batch, shared by every layer
    args = (q_TND, k_cache, v_cache, batch.block_tables, batch.query_start, batch.context_lens_t, scale,
            batch.max_query_len)
    if hopper:
        max_prefix = max(c - ql for ql, c in zip(batch.query_lens, batch.context_lens) if ql > 1)
        out = paged_prefill_fa3(*args, max_prefix, skip_single=single is not None)
    else:
        out = paged_prefill_fa(*args, skip_single=single is not None)
    if single is not None:
        out[single.rows] = paged_decode(q_TND[single.rows], k_cache, v_cache, single.block_tables,
                                        single.context_lens_t, scale, single.max_context)
    return out
