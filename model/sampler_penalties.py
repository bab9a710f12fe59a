"""logit_bias, min_tokens and penalties on the raw logits, vectorised on the logits' device, in
vLLM's order: sparse additions (logit_bias, and -inf on the stop tokens of rows still short of
min_tokens) first, then the repetition penalty, then frequency and presence:

    x = x + bias
    x = where(seen, where(x > 0, x / r, x * r), x)     seen: in the prompt or generated so far
    x = x - f * count - p * (count > 0)               count: times generated so far

The counts live on the device, one slot per sequence with penalties ([S, V] int32, and a [S, V]
prompt mask for the repetition penalty), filled when stage 0 assigns the slot and updated by a
scatter right after each draw (so a step queued before its input token reached the host still
sees it). A row without a slot (-1) has p = f = 0 and r = 1, which leave its logits bit-identical.
Letters: R sampled rows, V vocabulary, S slots, N sparse entries."""
from __future__ import annotations

import torch

from .sampler import C_FREQUENCY, C_PRESENCE, C_REPETITION, C_SLOT


def add_sparse(logits_RV: torch.Tensor, entries_N3: torch.Tensor) -> torch.Tensor:
    """logits + the (row, token, float32 bits of value) entries, summed where they repeat (int32
    [N, 3]); returns a new tensor."""
    R, V = logits_RV.shape
    e = entries_N3.to(torch.int64)
    flat = logits_RV.float().reshape(-1).clone()
    flat.index_add_(0, e[:, 0] * V + e[:, 1], entries_N3[:, 2].contiguous().view(torch.float32))
    return flat.view(R, V)


class PenaltyState:
    """Per-slot token counts and prompt masks of one last stage."""

    def __init__(self, slots: int, vocab: int, device: torch.device, fused: bool = False):
        """fused: apply() as one Triton launch (model/penalties_triton.py; model.backend.PENALTIES_FUSED)."""
        self.counts_SV = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.prompt_SV = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.fused = fused

    @property
    def slots(self) -> int:
        return self.counts_SV.shape[0]

    def init(self, resets: torch.Tensor, prompt_N2: torch.Tensor, output_N2: torch.Tensor) -> None:
        """Clear the slots `resets` (int32), then mark (slot, token) prompt tokens and count (slot,
        token) output tokens (a slot (re)started: new sequence, or resumed after preemption)."""
        V = self.counts_SV.shape[1]
        if resets.numel():
            r = resets.to(torch.int64)
            self.counts_SV.index_fill_(0, r, 0)
            self.prompt_SV.index_fill_(0, r, False)
        if prompt_N2.numel():
            p = prompt_N2.to(torch.int64)
            self.prompt_SV.view(-1).index_fill_(0, p[:, 0] * V + p[:, 1], True)
        if output_N2.numel():
            o = output_N2.to(torch.int64)
            self.counts_SV.view(-1).index_add_(0, o[:, 0] * V + o[:, 1],
                                               torch.ones(o.shape[0], dtype=torch.int32, device=o.device))

    def apply(self, logits_RV: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
        """The penalised logits (fp32 [R, V], a new tensor) of rows with slots."""
        if self.fused:
            from .penalties_triton import apply_penalties
            return apply_penalties(logits_RV, rows_R, self.counts_SV, self.prompt_SV)
        slot = rows_R[:, C_SLOT].to(torch.int64)
        s = slot.clamp(min=0)
        count = self.counts_SV.index_select(0, s)
        seen = (count > 0) | self.prompt_SV.index_select(0, s)
        f32 = torch.float32
        rep = rows_R[:, C_REPETITION].contiguous().view(f32)[:, None]
        x = logits_RV.float()
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        freq = rows_R[:, C_FREQUENCY].contiguous().view(f32)[:, None]
        pres = rows_R[:, C_PRESENCE].contiguous().view(f32)[:, None]
        return x - freq * count.to(f32) - pres * (count > 0).to(f32)

    def record(self, rows_R: torch.Tensor, ids_R: torch.Tensor) -> None:
        """Count each sampled token in its row's slot (rows without a slot add 0)."""
        slot = rows_R[:, C_SLOT].to(torch.int64)
        has = (slot >= 0).to(torch.int32)
        V = self.counts_SV.shape[1]
        self.counts_SV.view(-1).index_add_(0, slot.clamp(min=0) * V + ids_R, has)
