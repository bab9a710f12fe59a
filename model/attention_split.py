"""Chunked prefill as two fused attention calls merged by their log-sum-exp, so that a chunk deep in
a context runs on the vendor's Hopper attention kernels (cuDNN, FlashAttention) instead of a masked
or gathered general path.

A chunk of ql queries at offset o = ctx - ql attends
  (1) the cached prefix [0, o), with no mask: every prefix key is visible to every query, and
  (2) its own keys [o, ctx), with the square causal mask, whose top-left and bottom-right
      alignments agree.
out = (e^{lse1} o1 + e^{lse2} o2) / (e^{lse1} + e^{lse2}) per (query, head), in fp32.

GQA without a kernel that knows it: in (1) no row depends on its position, so the G query heads of
kv head k are stacked as G * ql rows of one head: q [1, K, G * ql, D] against k/v [1, K, o, D]. Part
(2) is small (ql x ql) and repeats the chunk's kv heads G times.

Opt-in (attention="split"), not the default: torch's cuDNN attention builds an execution plan for
every new (queries, keys) shape, which the engine meets at every chunk of every request.

Letters: T tokens, N query heads, K kv heads (G = N // K), D head_dim, P blocks, S block size.
Rows with a single query (decodes in a prefill micro-batch) go to a paged decode function."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from .attention_sdpa import per_chunk
from .batch import AttnBatch

BACKENDS = ("cudnn", "flash", "math")  # math: fp32 torch maths with the same lse (CPU, tests)


@functools.lru_cache(maxsize=None)
def cudnn_ok(device_index: int) -> bool:
    """Whether this torch build runs cuDNN's fused attention on that GPU (a tiny call, once)."""
    try:
        q = torch.zeros(1, 1, 128, 128, device=f"cuda:{device_index}", dtype=torch.bfloat16)
        _attend_lse(q, q, q, True, 1.0, "cudnn")
        torch.cuda.synchronize(device_index)
        return True
    except RuntimeError:
        return False


def _attend_lse(q_1HQD: torch.Tensor, k_1HKD: torch.Tensor, v_1HKD: torch.Tensor, causal: bool, scale: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [1, H, Q, D] in q's dtype, lse [1, H, Q] fp32, natural log) of softmax(q k^T * scale) v,
    with the top-left causal mask when `causal` (Q == keys there)."""
    if backend == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q_1HQD, k_1HKD, v_1HKD, None, True, 0.0, causal,
                                                               False, scale=scale)
        return r[0], r[1].reshape(q_1HQD.shape[:3]).float()
    if backend == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q_1HQD, k_1HKD, v_1HKD, 0.0, causal, False,
                                                               scale=scale)
        return r[0], r[1].reshape(q_1HQD.shape[:3]).float()
    s = torch.matmul(q_1HQD.float(), k_1HKD.float().transpose(-1, -2)) * scale
    if causal:
        Q, Kn = s.shape[-2:]
        s = s.masked_fill(torch.ones(Q, Kn, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v_1HKD.float()).to(q_1HQD.dtype), lse


def chunk_attend(q_QND: torch.Tensor, k_ctxKD: torch.Tensor, v_ctxKD: torch.Tensor, scale: float,
                 backend: str) -> torch.Tensor:
    """Causal attention of one chunk's ql queries [ql, N, D], the last ql of ctx positions, over its
    contiguous keys/values [ctx, K, D]: [ql, N, D]."""
    ql, N, D = q_QND.shape
    ctx, K = k_ctxKD.shape[0], k_ctxKD.shape[1]
    G, o = N // K, ctx - ql
    # (2) the chunk's own keys, causal: heads repeated to N, [1, N, ql, D]
    q_own = q_QND.transpose(0, 1)[None]
    k_own, v_own = (t[o:].repeat_interleave(G, dim=1).transpose(0, 1)[None] for t in (k_ctxKD, v_ctxKD))
    out2, lse2 = _attend_lse(q_own, k_own, v_own, True, scale, backend)  # [1, N, ql, D], [1, N, ql]
    if o == 0:
        return out2[0].transpose(0, 1)
    # (1) the prefix, no mask: kv head k's G query heads as G * ql rows, [1, K, G * ql, D]
    q_pre = q_QND.reshape(ql, K, G, D).permute(1, 2, 0, 3).reshape(1, K, G * ql, D)
    k_pre, v_pre = (t[:o].transpose(0, 1)[None] for t in (k_ctxKD, v_ctxKD))  # [1, K, o, D]
    out1, lse1 = _attend_lse(q_pre, k_pre, v_pre, False, scale, backend)
    out1 = out1.reshape(K, G, ql, D).reshape(N, ql, D)
    lse1 = lse1.reshape(N, ql)
    m = torch.maximum(lse1, lse2[0])
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2[0] - m)
    out = (out1.float() * w1[..., None] + out2[0].float() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(q_QND.dtype).transpose(0, 1)


def prefill_split(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttnBatch,
                  scale: float, decode: Callable, backend: str) -> torch.Tensor:
    """Every chunk of the micro-batch through chunk_attend (attention_sdpa.per_chunk: K/V gathered
    contiguous, single-query rows to `decode`)."""
    if backend not in BACKENDS:
        raise ValueError(f"split attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return per_chunk(q_TND, k_cache, v_cache, batch, scale, decode,
                     lambda q, k, v: chunk_attend(q, k, v, scale, backend))
