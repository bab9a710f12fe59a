"""RMSNorm as HF computes it: normalise in fp32, cast to the input dtype, then multiply by weight."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm, through the fused Triton kernel on CUDA (model.fused_triton.ENABLED)."""
    if x.is_cuda:
        from .fused_triton import rms_norm_fused, use_fused
        if use_fused(x):
            return rms_norm_fused(x, weight, eps)
    return rms_norm(x, weight, eps)
