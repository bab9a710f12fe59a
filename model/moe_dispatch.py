"""Which fused MoE path a micro-batch takes (CUDA, or the interpreter in tests), by its (token,
expert) pair count P = N * k against the Backend's thresholds (model.backend):
- the per-pair GEMV path (model/fused_moe_triton.experts_small) up to small_max_pairs;
- the grouped GEMMs that find their experts' tokens themselves (model/moe_rows_triton): the
  token-row form up to rows_max_pairs while one row tile holds every token, then its ranked form
  up to ranked_max_pairs;
- else the grouped GEMMs over an align (model/fused_moe_triton.experts_large).
"""
from __future__ import annotations

import torch

from .fused_moe_triton import experts_large, experts_small
from .moe_route_triton import route_fused
from .moe_rows_triton import experts_rows, ranked_fit, rows_fit


def fused_experts(x_NH, w13_E2IH, w2_EHI, ids_Nk, w_Nk, small_max_pairs: int,
                  n_major_min_bm: int = 0, rows_max_pairs: int = 0, ranked_max_pairs: int = 0) -> torch.Tensor:
    """The experts' output [N, H] by the path the thresholds pick (module docstring); the aligned
    grouped GEMM launches its row tiles of n_major_min_bm and more N-major."""
    if ids_Nk.numel() <= small_max_pairs:
        return experts_small(x_NH, w13_E2IH, w2_EHI, ids_Nk, w_Nk)
    if rows_fit(*ids_Nk.shape, rows_max_pairs):
        return experts_rows(x_NH, w13_E2IH, w2_EHI, ids_Nk, w_Nk)
    if ranked_fit(*ids_Nk.shape, w13_E2IH.shape[0], ranked_max_pairs, x_NH.device):
        return experts_rows(x_NH, w13_E2IH, w2_EHI, ids_Nk, w_Nk, ranked=True)
    return experts_large(x_NH, w13_E2IH, w2_EHI, ids_Nk, w_Nk, n_major_min_bm=n_major_min_bm)


def fused_moe(x_NH: torch.Tensor, gate_EH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor,
              top_k: int, norm_topk_prob: bool, small_max_pairs: int,
              linear=torch.nn.functional.linear, n_major_min_bm: int = 0, rows_max_pairs: int = 0,
              ranked_max_pairs: int = 0) -> torch.Tensor:
    """Route (the reference's expert choice: model/moe_route_triton) then the fused experts.
    linear: the router GEMM (Backend.linear in the engine)."""
    w, ids = route_fused(x_NH, gate_EH, top_k, norm_topk_prob, linear)
    return fused_experts(x_NH, w13_E2IH, w2_EHI, ids, w, small_max_pairs, n_major_min_bm, rows_max_pairs,
                         ranked_max_pairs)
