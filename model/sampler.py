"""Vectorised sampling of a whole batch on the logits' device: greedy rows (temperature 0) mixed
with sampled rows (temperature, top-k, then top-p on what top-k kept, min-p relative to the most
likely token). The draw is the Gumbel-max trick with noise from a counter-based hash of
(seed, step, vocab index) computed on the device, so a row's token depends only on its own logits,
seed and step: never on the batch, its neighbours or the number of stages. No per-row loop.

A sampling row is ROW int32 values: temperature (float32 bits), top_k, top_p (float32 bits),
min_p (float32 bits), seed low 32 bits, seed high 32 bits, step, 0."""
from __future__ import annotations

import numpy as np
import torch

ROW = 8
F_SAMPLED, F_FILTERED = 1, 2  # flags: some row has temperature > 0; some row uses top-k/top-p/min-p
_M32 = 0xFFFFFFFF
_NOISE_ROWS = 64  # rows of [rows, V] int64 noise made at a time (bounds the temporary memory)


def pack_rows(rows: list[tuple[float, int, float, float, int, int]]) -> tuple[np.ndarray, int]:
    """[(temperature, top_k, top_p, min_p, seed, step)] -> (int32 [R, ROW], flags)."""
    out = np.zeros((len(rows), ROW), dtype=np.int32)
    if not rows:
        return out, 0
    a = np.asarray(rows, dtype=object)
    out[:, 0] = np.asarray(a[:, 0], dtype=np.float32).view(np.int32)
    out[:, 1] = np.asarray(a[:, 1], dtype=np.int64)
    out[:, 2] = np.asarray(a[:, 2], dtype=np.float32).view(np.int32)
    out[:, 3] = np.asarray(a[:, 3], dtype=np.float32).view(np.int32)
    seeds = np.asarray([int(s) & (2**64 - 1) for s in a[:, 4]], dtype=np.uint64)
    out[:, 4] = (seeds & np.uint64(_M32)).astype(np.uint32).view(np.int32)
    out[:, 5] = (seeds >> np.uint64(32)).astype(np.uint32).view(np.int32)
    out[:, 6] = np.asarray(a[:, 5], dtype=np.int64)
    temp = out[:, 0].view(np.float32)
    sampled = temp > 0
    flags = F_SAMPLED if sampled.any() else 0
    filt = (out[:, 1] > 0) | (out[:, 2].view(np.float32) < 1) | (out[:, 3].view(np.float32) > 0)
    if (sampled & filt).any():
        flags |= F_FILTERED
    return out, flags


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & _M32


def row_keys(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """int64 [R] of uint32 values: the hash of each row's (seed, step)."""
    return _mix(_u32(seed_lo) ^ _mix(_u32(seed_hi) ^ _mix((_u32(step) + 0x9E3779B9) & _M32)))


def gumbel_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [R, V] (float32), a pure function of (seed, step, vocab index)."""
    key = row_keys(seed_lo, seed_hi, step)
    col = _mix((torch.arange(vocab, device=key.device, dtype=torch.int64) * 0x61C88647 + 0x3C6EF372) & _M32)
    bits = _mix(key[:, None] ^ col[None, :]) >> 8  # 24 random bits
    u = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(u))


def filter_logits(x_RV: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's kept set: top-k (0 = off), then the smallest prefix of what is left
    whose probability reaches top_p, and tokens below min_p times the top token's probability."""
    V = x_RV.shape[-1]
    sorted_x, order = torch.sort(x_RV, dim=-1, descending=True)
    rank = torch.arange(V, device=x_RV.device)
    k = torch.where(top_k > 0, top_k.to(torch.int64), V).clamp(max=V)
    drop = rank[None, :] >= k[:, None]
    floor = sorted_x[:, :1] + torch.log(min_p.clamp(min=0))[:, None]  # log 0 = -inf: nothing dropped
    drop |= sorted_x < floor
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    # a token goes when the prefix before it already reached top_p (rows with top_p 1 keep all)
    drop |= ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    drop[:, 0] = False
    kept = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x_RV).scatter_(1, order, kept)


_FUSED_OK = [True]


def _fused_draw(x_RV: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor | None:
    """The same draw as the torch loop below through one fused Triton pass (no [R, V] noise);
    None (and the torch path from then on) if the kernel cannot run here."""
    if not _FUSED_OK[0]:
        return None
    try:
        from .sampler_triton import gumbel_argmax
        return gumbel_argmax(x_RV.contiguous(), row_keys(rows_R[:, 4], rows_R[:, 5], rows_R[:, 6]))
    except Exception as e:  # noqa: BLE001 - a compile failure must not take sampling down
        import sys
        print(f"[moepipe] fused sampler unavailable ({type(e).__name__}: {e}); using the torch path",
              file=sys.stderr)
        _FUSED_OK[0] = False
        return None


def sample(logits_RV: torch.Tensor, rows_R: torch.Tensor, flags: int | None = None) -> torch.Tensor:
    """One token id per row of fp32 logits [R, V] given int32 sampling rows [R, ROW] on the same
    device; returns int64 [R]. flags (pack_rows') skips work no row needs; None: assume all."""
    greedy = torch.argmax(logits_RV, dim=-1)
    if logits_RV.shape[0] == 0 or (flags is not None and not flags & F_SAMPLED):
        return greedy
    flags = (F_SAMPLED | F_FILTERED) if flags is None else flags
    temp = rows_R[:, 0].view(torch.float32)
    sampled = temp > 0
    x = logits_RV.float() / torch.where(sampled, temp, 1.0)[:, None]
    if flags & F_FILTERED:
        x = filter_logits(x, rows_R[:, 1], rows_R[:, 2].view(torch.float32), rows_R[:, 3].view(torch.float32))
    drawn = _fused_draw(x, rows_R) if x.is_cuda else None
    if drawn is not None:
        return torch.where(sampled, drawn, greedy)
    out = torch.empty_like(greedy)
    V = x.shape[-1]
    for r0 in range(0, x.shape[0], _NOISE_ROWS):  # bounded temporaries, not a per-row loop
        r1 = min(r0 + _NOISE_ROWS, x.shape[0])
        rr = rows_R[r0:r1]
        out[r0:r1] = torch.argmax(x[r0:r1] + gumbel_noise(rr[:, 4], rr[:, 5], rr[:, 6], V), dim=-1)
    return torch.where(sampled, out, greedy)
