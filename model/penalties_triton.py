"""PenaltyState.apply in one Triton launch: per row, the repetition penalty on tokens seen (in the
prompt or generated), then frequency and presence, read straight from the slot's counts and
prompt mask. The same fp32 steps as the torch maths in model/sampler_penalties.py (correctly
rounded division, no fused multiply-add), so the two agree to the bit. Grid: (rows, vocab tiles)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampler import C_FREQUENCY, C_PRESENCE, C_REPETITION, C_SLOT, ROW

BV = 2048  # vocabulary entries per program


@triton.jit
def _penalties_kernel(x_ptr, counts_ptr, prompt_ptr, rows_ptr, out_ptr, V, stride_x,
                      ROW: tl.constexpr, C_SLOT: tl.constexpr, C_REP: tl.constexpr, C_FREQ: tl.constexpr,
                      C_PRES: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BV + tl.arange(0, BV)
    m = v < V
    x = tl.load(x_ptr + r * stride_x + v, mask=m, other=0.0).to(tl.float32)
    # a row without a slot (-1) reads slot 0 with the p = f = 0, r = 1 it carries: x unchanged
    # (as the torch maths, which clamps the same way)
    slot = tl.maximum(tl.load(rows_ptr + r * ROW + C_SLOT).to(tl.int64), 0)
    rep = tl.load(rows_ptr + r * ROW + C_REP).to(tl.float32, bitcast=True)
    freq = tl.load(rows_ptr + r * ROW + C_FREQ).to(tl.float32, bitcast=True)
    pres = tl.load(rows_ptr + r * ROW + C_PRES).to(tl.float32, bitcast=True)
    c = tl.load(counts_ptr + slot * V + v, mask=m, other=0)
    seen = (c > 0) | (tl.load(prompt_ptr + slot * V + v, mask=m, other=0) != 0)
    x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
    x = x - freq * c.to(tl.float32)
    x = x - pres * (c > 0).to(tl.float32)
    tl.store(out_ptr + r * V + v, x, mask=m)


def apply_penalties(logits_RV: torch.Tensor, rows_R: torch.Tensor, counts_SV: torch.Tensor,
                    prompt_SV: torch.Tensor) -> torch.Tensor:
    """fp32 [R, V] (a new tensor): PenaltyState.apply's result. rows_R: int32 [R, ROW] (sampler rows);
    counts_SV int32, prompt_SV bool, both [S, V]."""
    R, V = logits_RV.shape
    assert rows_R.dtype == torch.int32 and rows_R.shape[1] == ROW and rows_R.is_contiguous()
    assert logits_RV.stride(1) == 1 and counts_SV.is_contiguous() and prompt_SV.is_contiguous()
    out = torch.empty(R, V, dtype=torch.float32, device=logits_RV.device)
    if R:
        _penalties_kernel[(R, triton.cdiv(V, BV))](
            logits_RV, counts_SV, prompt_SV.view(torch.uint8), rows_R, out, V, logits_RV.stride(0), ROW=ROW,
            C_SLOT=C_SLOT, C_REP=C_REPETITION, C_FREQ=C_FREQUENCY, C_PRES=C_PRESENCE, BV=BV, num_warps=8,
            enable_fp_fusion=False)
    return out
