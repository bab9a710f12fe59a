"""The last stage's sampling step: apply a plan's grammar bitmask (structured output) and sampling
extras (engine/runtime/sampling_plan.py) to the logits on the device, draw, count the drawn tokens of rows
with penalties, and build the logprob table stage 0 asked for. No per-row loop and no host sync; a
plan without a bitmask or extras takes exactly the plain sampler's path."""
from __future__ import annotations

import torch

from model.sampler import C_PROCESSED, F_LOGPROBS, F_PENALTY, F_PROCESSED, sample_with
from model.sampler_logprobs import logprob_table, width
from model.sampler_penalties import PenaltyState, add_sparse

from .step_plan import H_LPK, H_MASKW, H_NB, H_NO, H_NP, H_NR, H_NS, H_SLOTS, PlanView


class LastStageSampler:
    def __init__(self, vocab: int, device: torch.device, penalties_fused: bool = False):
        """penalties_fused: PenaltyState.apply as one Triton launch (model.backend.Backend)."""
        self.vocab, self.device, self.penalties_fused = vocab, device, penalties_fused
        self.state: PenaltyState | None = None  # made when the first plan with penalty slots arrives

    def has_work(self, view: PlanView) -> bool:
        h = view.header
        return bool(view.R or view.P or h[H_NR] or h[H_NP] or h[H_NO])

    def __call__(self, logits: torch.Tensor, view: PlanView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(int64 [R] sampled ids, fp32 [R + P, 2 + 2k] logprob table or None) of logits [R + P, V]:
        the R sampled rows, then the P prompt rows."""
        h, R, flags = view.header, view.R, view.flags
        if h[H_NR] or h[H_NP] or h[H_NO]:
            if self.state is None or self.state.slots < h[H_SLOTS]:
                self.state = PenaltyState(h[H_SLOTS], self.vocab, self.device, fused=self.penalties_fused)
            self.state.init(view.part("resets"), view.part("prompt_pairs").view(-1, 2),
                            view.part("output_pairs").view(-1, 2))
        raw = logits[:R] if not h[H_NS] else grammar_masked(logits[:R], view)
        rows = view.rows
        x = add_sparse(raw, view.part("bias").view(-1, 3)) if h[H_NB] else raw
        if flags & F_PENALTY:
            x = self.state.apply(x, rows)
        ids, processed = sample_with(x, rows, flags, bool(flags & F_PROCESSED))
        if flags & F_PENALTY:
            self.state.record(rows, ids)
        if not h[H_LPK]:
            return ids, None
        k = h[H_LPK] - 1
        if flags & F_LOGPROBS:
            src = raw if processed is None else torch.where(rows[:, C_PROCESSED, None] != 0, processed, raw)
            table = logprob_table(src, ids, k)
        else:
            table = torch.zeros(R, width(k), dtype=torch.float32, device=logits.device)
        if view.P:
            table = torch.cat([table, logprob_table(logits[R:], view.part("prompt_targets"), k)])
        return ids, table


def grammar_masked(logits_RV: torch.Tensor, view: PlanView) -> torch.Tensor:
    """The logits with -inf where the plan's bitmask forbids a token, on its NS structured rows
    (gathered, masked in one op, scattered back; the other rows are untouched). This is what the
    rest of sampling sees, raw logprobs included (as vLLM applies the bitmask before its sampler)."""
    from ..structured.bitmask import apply_token_bitmask
    idx = view.part("mask_rows").long()
    masked = apply_token_bitmask(logits_RV.index_select(0, idx),
                                 view.part("bitmask").view(view.header[H_NS], view.header[H_MASKW]))
    return logits_RV.index_copy(0, idx, masked)
