"""Fused Gumbel-max on CUDA: per row, argmax over the vocabulary of x + Gumbel noise, the noise
hashed from (row key, vocab index) exactly as model/sampler.py's gumbel_noise does (lowbias32 on
uint32), in one pass over x with no [R, V] temporaries."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_argmax_kernel(x_ptr, stride, key_ptr, out_ptr, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    key = tl.load(key_ptr + r).to(tl.uint32)
    c1 = tl.full((), 0x7FEB352D, tl.uint32)  # lowbias32's multipliers (wrapping uint32 products)
    c2 = tl.full((), 0x846CA68B, tl.uint32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        m = offs < V
        x = tl.load(x_ptr + r * stride + offs, mask=m, other=float("-inf")).to(tl.float32)
        h = offs.to(tl.uint32) * tl.full((), 0x61C88647, tl.uint32) + tl.full((), 0x3C6EF372, tl.uint32)
        h = h ^ (h >> 16)  # col = lowbias32(h), written out: nested jit calls break the interpreter
        h = h * c1
        h = h ^ (h >> 15)
        h = h * c2
        h = h ^ (h >> 16)
        h = key ^ h  # bits = lowbias32(key ^ col) >> 8
        h = h ^ (h >> 16)
        h = h * c1
        h = h ^ (h >> 15)
        h = h * c2
        h = h ^ (h >> 16)
        bits = h >> 8
        u = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        s = x - tl.log(-tl.log(u))
        s = tl.where(m, s, float("-inf"))
        take = s > best  # strictly greater: the lowest index wins a tie within a lane
        best = tl.where(take, s, best)
        best_i = tl.where(take, offs, best_i)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_i, 2147483647), 0)  # the lowest index among ties
    tl.store(out_ptr + r, idx.to(tl.int64))


def gumbel_argmax(x_RV: torch.Tensor, key_R: torch.Tensor) -> torch.Tensor:
    """argmax(x + gumbel(key, vocab index)) per row; x fp32 [R, V] (rows contiguous), key int64 [R]
    holding uint32 values. Returns int64 [R]."""
    R, V = x_RV.shape
    out = torch.empty(R, dtype=torch.int64, device=x_RV.device)
    if R:
        _gumbel_argmax_kernel[(R,)](x_RV, x_RV.stride(0), key_R.contiguous(), out, V, BLOCK=1024)
    return out
