"""Prefill chunk sizes that cost about the same at any depth (SGLang's dynamic chunking).

Attention work grows with the prefix a chunk attends to, so equal-size chunks of a long prompt get
slower as it goes on; in a pipeline the stage holding the later chunk then runs behind and the
other waits. A chunk after p cached tokens gets the token count whose modeled cost equals that of
a full-budget chunk at prefix 0.

Cost per layer of a chunk of n tokens after p cached tokens, in ms, fitted from measured stage
time by bench/fit_chunk_cost.py:

    ms(n, p) = c0 + a * n + b * (n * p + n * (n + 1) / 2)

c0 per chunk, a per token (projections, MoE, norms), b per causal (query, key) pair. Only the
ratios matter for sizing, so coefficients fitted on one card and model serve others roughly.
No torch here (the scheduler's layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkCost:
    c0: float  # ms per chunk
    a: float  # ms per token
    b: float  # ms per (query, key) pair
    source: str = ""

    def ms(self, n: int, prefix: int) -> float:
        return self.c0 + self.a * n + self.b * (n * prefix + n * (n + 1) / 2)

    def tokens_for(self, prefix: int, target_ms: float) -> float:
        """The (real) n >= 0 with ms(n, prefix) == target_ms: (b/2) n^2 + (a + b (p + 1/2)) n + c0 = t."""
        lin, rest = self.a + self.b * (prefix + 0.5), target_ms - self.c0
        if rest <= 0:
            return 0.0
        if self.b <= 0:
            return rest / lin if lin > 0 else math.inf
        half = self.b / 2
        return (-lin + math.sqrt(lin * lin + 4 * half * rest)) / (2 * half)


# Coefficients fitted for the qwen3-30b-a3b shape (32 q / 4 kv heads, head_dim 128, hidden 2048, 8 of
# 128 experts), bf16, block 16, attention 'fa', 2 layers of dummy weights, over chunk lengths n and
# prefixes p; the points and the fit's error are in `source`. Refit: bench/fit_chunk_cost.py --measure.
# c0 is mostly the expert weights, read once per chunk.
QWEN3_30B_FIT = ChunkCost(c0=1.126, a=2.592e-4, b=5.054e-8,
                          source="NVIDIA H100 80GB HBM3, bench/results/chunk_cost_H100_2026-11-28_v1.json")


class ChunkSizer:
    """sizer(prefix, prompt_len) -> tokens for the next prefill chunk of a sequence with `prefix`
    tokens already scheduled: the full budget at prefix 0, fewer deeper in, so that every chunk's
    modeled cost is about the same target. Counts are multiples of `align`, at least min_tokens.

    The target is the cost of a full-budget chunk at prefix 0, raised for long prompts on several
    stages: with S stages and chunks of equal cost t, time to first token is about
    W + n_chunks * c0 + (S - 1) * t (W: the prompt's work), smallest at t = c0 + sqrt(c0 W / (S - 1)).
    Smaller chunks keep the stages in step but each pays c0 (the expert weights are read per chunk).

    Kernel size: on one stage the scheduler builds no sizer, so every chunk takes the full budget
    (nothing to keep in step; a budget of 8192 is 512 query tiles x 4 kv heads of the prefill
    kernel, many waves on 132 SMs). On several stages a chunk shrinks to min_tokens at most; the
    grid of such a short chunk deep in the context underfills the SMs, which the Hopper kernel
    makes up by splitting the keys (model/attention_prefill_fa3.choose_kv_splits).
    """

    def __init__(self, budget: int, cost: ChunkCost = QWEN3_30B_FIT, num_stages: int = 2,
                 min_tokens: int = 512, align: int = 64):
        if budget < 1:
            raise ValueError(f"chunk budget must be at least 1 token, got {budget}")
        if min_tokens < 1 or align < 1:
            raise ValueError(f"min_tokens ({min_tokens}) and align ({align}) must be at least 1")
        self.budget, self.cost, self.num_stages = budget, cost, num_stages
        self.min_tokens, self.align = min(min_tokens, budget), align
        self.base_ms = cost.ms(budget, 0)

    def target_ms(self, prompt_len: int | None = None) -> float:
        if prompt_len is None or self.num_stages < 2:
            return self.base_ms
        c = self.cost
        work = c.a * prompt_len + c.b * prompt_len * (prompt_len + 1) / 2
        return max(self.base_ms, c.c0 + math.sqrt(c.c0 * work / (self.num_stages - 1)))

    def __call__(self, prefix: int, prompt_len: int | None = None) -> int:
        if prefix <= 0:
            return self.budget
        n = self.cost.tokens_for(prefix, self.target_ms(prompt_len))
        if not math.isfinite(n):
            return self.budget
        n = int(n) // self.align * self.align
        return max(self.min_tokens, min(self.budget, n))

    def plan(self, prompt_len: int, start: int = 0) -> list[int]:
        """The chunk lengths of a prompt prefilled alone, from `start` on."""
        sizes, pos = [], start
        while pos < prompt_len:
            n = min(prompt_len - pos, self(pos, prompt_len))
            sizes.append(n)
            pos += n
        return sizes
