"""Sampling from fp32 logits: greedy at temperature 0, else temperature, top-k, top-p; a request
with a seed draws from a generator seeded by (seed, step), so it reproduces on any stage count."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowParams:
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    step: int  # index of the token being sampled within the request's output


def _filter(logits_V: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_V, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits_V = logits_V.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits_V


def sample(logits_RV: torch.Tensor, rows: list[RowParams], generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of fp32 logits [R, V]; returns int64 [R] on the logits' device."""
    out = torch.argmax(logits_RV, dim=-1)
    for r, p in enumerate(rows):
        if p.temperature == 0:
            continue
        logits = _filter(logits_RV[r] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(logits, -1)
        if p.seed is not None:
            g = torch.Generator(device=logits.device)
            g.manual_seed((p.seed * 1_000_003 + p.step) % (2**63))
        else:
            g = generator
        out[r] = torch.multinomial(probs, 1, generator=g)[0]
    return out
