"""RMSNorm as HF computes it: normalise in fp32, cast to the input dtype, then multiply by weight."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    """rms_norm; one Triton kernel when fused (the Backend's choice, CUDA only)."""
    if fused:
        from .fused_triton import rms_norm_fused
        return rms_norm_fused(x, weight, eps)
    return rms_norm(x, weight, eps)


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
             fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to the dtype first as torch does."""
    if fused:
        from .fused_triton import add_rms_norm_fused
        return add_rms_norm_fused(x, residual, weight, eps)
    h = x + residual
    return rms_norm(h, weight, eps), h
