"""Rotary position tables (default and static YaRN, HF >= 4.56 maths) and their application."""
from __future__ import annotations

import math

import torch

from .config import RopeConfig


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def inv_freq_and_scaling(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] in fp32 and the attention_scaling that multiplies cos and sin."""
    base = rope.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / pos_freqs
    if rope.rope_type == "default":
        return inv_freq, 1.0
    s, L0 = rope.factor, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(L0 / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp  # 1 -> keep original frequency
    inv_freq = (1.0 / (s * pos_freqs)) * (1 - extrapolation_factor) + inv_freq * extrapolation_factor
    if rope.attention_factor is not None:
        scaling = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        scaling = _yarn_mscale(s, rope.mscale) / _yarn_mscale(s, rope.mscale_all_dim)
    else:
        scaling = _yarn_mscale(s)
    return inv_freq, scaling


class Rope:
    """cos/sin for given positions, computed on the fly as HF does (fp32 angles, dtype output)."""

    def __init__(self, rope: RopeConfig, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        inv_freq, self.scaling = inv_freq_and_scaling(rope, head_dim)
        self.inv_freq = inv_freq.to(device)
        self.dtype = dtype

    def __call__(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_T.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(self.dtype), (emb.sin() * self.scaling).to(self.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """NeoX half-split rotation in the input dtype; cos/sin broadcast over heads."""
    cos, sin = cos_TD[:, None, :], sin_TD[:, None, :]
    return x_THD * cos + rotate_half(x_THD) * sin
