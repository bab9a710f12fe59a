"""Vectorised sampling of a whole batch on the logits' device: greedy rows (temperature 0) mixed
with sampled rows (temperature, then top-k, min-p and top-p). The draw is the Gumbel-max trick with
noise from a counter-based hash of (seed, step, vocab index) computed on the device, so a row's
token depends only on its own logits, seed and step: never on the batch, its neighbours or the
number of stages. No per-row loop.

Filters, on x = logits.float() / temperature (fp32, computed in torch on every path). Each one is a
threshold on the value, so tokens of equal value (common: the logits are bf16) are kept or dropped
together:
- top-k (0 < k < V): keep x >= v_k, the k-th largest value (every token tied with it stays);
- min-p (> 0): keep x >= floor = x.amax(-1) + log(min_p) (fp32, min_p_floor; min_p 0 keeps all);
- top-p (< 1), on what top-k and min-p kept, renormalised: a kept token stays iff the probability
  mass of the kept tokens with a value strictly greater than its own is < top_p (the top value
  always stays).
Then argmax(x + gumbel) over the kept tokens (the lowest index wins an exact tie). On CUDA one
Triton program per row finds the thresholds and draws (model/sampler_triton.py); elsewhere
filter_logits (sort + searchsorted) is the reference. The two sum the top-p masses in different
orders, so a row whose mass at a boundary is within fp32 rounding of top_p can differ.

Before all this, rows that ask for them get logit_bias and penalties on the raw logits, in vLLM's
order (model/sampler_penalties.py), and logprobs are read from the raw or the processed logits
(model/sampler_logprobs.py); `sample_with` returns the processed logits for those.

A sampling row is ROW int32 values: temperature (float32 bits), top_k, top_p (float32 bits),
min_p (float32 bits), seed low 32 bits, seed high 32 bits, step, penalty slot (-1: none),
presence, frequency and repetition penalty (float32 bits), logprobs k (-1: none), 1 if its
logprobs are of the processed logits, then 0s."""
from __future__ import annotations

import numpy as np
import torch

ROW = 16
(C_TEMP, C_TOP_K, C_TOP_P, C_MIN_P, C_SEED_LO, C_SEED_HI, C_STEP, C_SLOT, C_PRESENCE, C_FREQUENCY, C_REPETITION,
 C_LOGPROBS, C_PROCESSED) = range(13)
# flags of a batch, so that work no row needs is skipped: some row has temperature > 0; some row
# uses top-k/top-p/min-p; some row has penalties (a slot); some row wants logprobs; some row wants
# them of the processed logits
F_SAMPLED, F_FILTERED, F_PENALTY, F_LOGPROBS, F_PROCESSED = 1, 2, 4, 8, 16
_DEFAULTS = (-1, 0.0, 0.0, 1.0, -1, 0)  # slot, presence, frequency, repetition, logprobs k, processed
_M32 = 0xFFFFFFFF
_NOISE_ROWS = 64  # rows of [rows, V] int64 noise made at a time (bounds the temporary memory)


def pack_rows(rows: list[tuple]) -> tuple[np.ndarray, int]:
    """[(temperature, top_k, top_p, min_p, seed, step[, slot, presence, frequency, repetition,
    logprobs k, processed])] -> (int32 [R, ROW], flags); missing trailing fields take the values
    that turn them off."""
    out = np.zeros((len(rows), ROW), dtype=np.int32)
    if not rows:
        return out, 0
    a = np.asarray([tuple(r) + _DEFAULTS[len(r) - 6:] for r in rows], dtype=object)
    out[:, 0] = np.asarray(a[:, 0], dtype=np.float32).view(np.int32)
    out[:, 1] = np.asarray(a[:, 1], dtype=np.int64)
    out[:, 2] = np.asarray(a[:, 2], dtype=np.float32).view(np.int32)
    out[:, 3] = np.asarray(a[:, 3], dtype=np.float32).view(np.int32)
    seeds = np.asarray([int(s) & (2**64 - 1) for s in a[:, 4]], dtype=np.uint64)
    out[:, 4] = (seeds & np.uint64(_M32)).astype(np.uint32).view(np.int32)
    out[:, 5] = (seeds >> np.uint64(32)).astype(np.uint32).view(np.int32)
    out[:, 6] = np.asarray(a[:, 5], dtype=np.int64)
    out[:, C_SLOT] = np.asarray(a[:, 6], dtype=np.int64)
    for c, j in ((C_PRESENCE, 7), (C_FREQUENCY, 8), (C_REPETITION, 9)):
        out[:, c] = np.asarray(a[:, j], dtype=np.float32).view(np.int32)
    out[:, C_LOGPROBS] = np.asarray(a[:, 10], dtype=np.int64)
    out[:, C_PROCESSED] = np.asarray(a[:, 11], dtype=np.int64)
    temp = out[:, 0].view(np.float32)
    sampled = temp > 0
    flags = F_SAMPLED if sampled.any() else 0
    filt = (out[:, 1] > 0) | (out[:, 2].view(np.float32) < 1) | (out[:, 3].view(np.float32) > 0)
    if (sampled & filt).any():
        flags |= F_FILTERED
    if (out[:, C_SLOT] >= 0).any():
        flags |= F_PENALTY
    lp = out[:, C_LOGPROBS] >= 0
    if lp.any():
        flags |= F_LOGPROBS
    if (lp & (out[:, C_PROCESSED] != 0)).any():
        flags |= F_PROCESSED
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


def min_p_floor(x_RV: torch.Tensor, min_p: torch.Tensor, max_R: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [R]: min-p's floor max(x) + log(min_p) (-inf for min_p 0); both paths use this one.
    max_R: x.amax(-1) if already at hand."""
    m = x_RV.amax(-1) if max_R is None else max_R
    return m + torch.log(min_p.to(x_RV.dtype).clamp(0, 1))


def filter_logits(x_RV: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's kept set (the module docstring's thresholds, ties kept together):
    the reference for the fused kernel and the path off CUDA. Sort, then each tied group's first
    position in the sorted row (searchsorted) stands for the whole group."""
    V = x_RV.shape[-1]
    sorted_x, order = torch.sort(x_RV, dim=-1, descending=True)
    neg = -sorted_x  # ascending
    first = torch.searchsorted(neg, neg, side="left")  # [R, V]: first position of each value's group
    k = torch.where((top_k > 0) & (top_k < V), top_k.to(torch.int64), V)
    keep = first < k[:, None]
    keep &= sorted_x >= min_p_floor(x_RV, min_p)[:, None]
    w = torch.where(keep, torch.exp(sorted_x - sorted_x[:, :1]), 0.0)
    above = (torch.cumsum(w, -1) - w).gather(-1, first)  # kept mass strictly above the group
    drop = (above >= top_p[:, None] * w.sum(-1, keepdim=True)) & (top_p < 1)[:, None] & (first > 0)
    kept = sorted_x.masked_fill(~(keep & ~drop), float("-inf"))
    return torch.empty_like(x_RV).scatter_(1, order, kept)


def gumbel_draw(x_RV: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
    """argmax(x + gumbel_noise) per row in torch (int64 [R]); -inf tokens never win, even where
    the noise is +inf (24 random bits of all ones round u to 1)."""
    out = torch.empty(x_RV.shape[0], dtype=torch.int64, device=x_RV.device)
    V = x_RV.shape[-1]
    for r0 in range(0, x_RV.shape[0], _NOISE_ROWS):  # bounded temporaries, not a per-row loop
        r1 = min(r0 + _NOISE_ROWS, x_RV.shape[0])
        rr, x = rows_R[r0:r1], x_RV[r0:r1]
        s = (x + gumbel_noise(rr[:, 4], rr[:, 5], rr[:, 6], V)).masked_fill(x == float("-inf"), float("-inf"))
        out[r0:r1] = torch.argmax(s, dim=-1)
    return out


_FUSED_OK = [True]


def _fused_draw(x_RV: torch.Tensor, rows_R: torch.Tensor, greedy_R: torch.Tensor, max_R: torch.Tensor,
                filtered: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """sample()'s (tokens, thresholds) through one Triton program per row (filters and draw; greedy
    rows take greedy_R; max_R = x.amax(-1)) with no [R, V] temporaries; None (and the torch path
    from then on) if the kernel cannot run here."""
    if not _FUSED_OK[0]:
        return None
    try:
        from .sampler_triton import filtered_gumbel_argmax
        x = x_RV.contiguous()
        if not filtered:
            return filtered_gumbel_argmax(x, rows_R, greedy_R=greedy_R)
        return filtered_gumbel_argmax(x, rows_R, min_p_floor(x, rows_R[:, 3].view(torch.float32), max_R), max_R,
                                      greedy_R)
    except Exception as e:  # noqa: BLE001 - a compile failure must not take sampling down
        import sys
        print(f"[moepipe] fused sampler unavailable ({type(e).__name__}: {e}); using the torch path",
              file=sys.stderr)
        _FUSED_OK[0] = False
        return None


def sample(logits_RV: torch.Tensor, rows_R: torch.Tensor, flags: int | None = None) -> torch.Tensor:
    """One token id per row of fp32 logits [R, V] given int32 sampling rows [R, ROW] on the same
    device; returns int64 [R]. flags (pack_rows') skips work no row needs; None: assume all."""
    return sample_with(logits_RV, rows_R, flags)[0]


def sample_with(logits_RV: torch.Tensor, rows_R: torch.Tensor, flags: int | None = None,
                processed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample(), and with processed=True also the logits it drew from (fp32 [R, V]: divided by the
    temperature on sampled rows, -inf outside their kept set; greedy rows' logits as given)."""
    greedy = torch.argmax(logits_RV, dim=-1)
    if logits_RV.shape[0] == 0 or (flags is not None and not flags & F_SAMPLED):
        return greedy, (logits_RV.float() if processed else None)
    flags = (F_SAMPLED | F_FILTERED) if flags is None else flags
    temp = rows_R[:, 0].view(torch.float32)
    sampled = temp > 0
    t = torch.where(sampled, temp, 1.0)
    x = logits_RV.float() / t[:, None]
    if x.is_cuda:
        # x.amax(-1) bitwise without a pass over x: dividing by t > 0 is monotone, so the largest
        # quotient is the rounded quotient of the largest logit
        m = logits_RV.gather(-1, greedy[:, None])[:, 0].float() / t
        drawn = _fused_draw(x, rows_R.contiguous(), greedy, m, bool(flags & F_FILTERED))
        if drawn is not None:
            ids, thr = drawn
            if processed:
                x = x.masked_fill(sampled[:, None] & (x < thr[:, None]), float("-inf"))
            return ids, (x if processed else None)
    if flags & F_FILTERED:
        f = filter_logits(x, rows_R[:, 1], rows_R[:, 2].view(torch.float32), rows_R[:, 3].view(torch.float32))
        x = torch.where(sampled[:, None], f, x) if processed else f
    return torch.where(sampled, gumbel_draw(x, rows_R), greedy), (x if processed else None)
