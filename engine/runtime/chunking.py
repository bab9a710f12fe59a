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
# 128 experts), bf16, block 64, attention 'fa' (on Hopper the TMA kernel), 2 layers of dummy weights,
# over chunk lengths n and prefixes p; the card, the points and the fit's error are in BENCHMARKS.md ("Chunk cost model") and
# the results file it names. Refit: bench/fit_chunk_cost.py --measure.
# c0 is mostly the expert weights, read once per chunk.
QWEN3_30B_FIT = ChunkCost(c0=0.9324, a=2.164e-4, b=3.285e-8,
                          source="bench/fit_chunk_cost.py --measure (BENCHMARKS.md: Chunk cost model)")


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


def chunk_pairs(n: int, prefix: int) -> float:
    """Causal (query, key) pairs of n new tokens after `prefix` cached ones."""
    return n * prefix + n * (n + 1) / 2


# StepCost.observe: the weight of each measured step in the running log-mean of the scale, and how
# far one step's ratio may sit from the current scale (a step caught behind a host stall or a
# compile moves it by at most CALIBRATION_CLAMP ** CALIBRATION_RATE, 1.32x)
CALIBRATION_RATE = 0.2
CALIBRATION_CLAMP = 4.0


@dataclass
class StepCost:
    """Time of one whole micro-batch through every layer, for `max_step_ms`: per layer
    c0 * f(T) + a * T + b * pairs, with the coefficients of a ChunkCost, T the micro-batch's tokens
    and pairs its causal (query, key) pairs (a decode at context c: c; a prefill chunk of n after p:
    n p + n (n + 1) / 2). f(T) = 1 - (1 - k/E)^T is the share of the E experts that T tokens routed
    to k each touch, about uniformly (c0 is mostly the expert weights, read once per step); 1 for a
    dense model. The fit's shape holds across cards and kernels but not its scale, so the engine
    calibrates it: observe() takes each measured step of stage 0 and keeps `scale`, a running
    (geometric) mean of measured over modeled time, by which ms() multiplies the fit."""
    layers: int
    experts: int = 0  # 0: a dense model
    top_k: int = 0
    per_layer: ChunkCost = QWEN3_30B_FIT
    scale: float = 1.0
    observed: int = 0  # steps observe() has taken

    def modeled_ms(self, tokens: int, pairs: float) -> float:
        """The fit's time, before the calibration's scale."""
        if tokens <= 0:
            return 0.0
        frac = 1 - (1 - self.top_k / self.experts) ** tokens if self.experts > self.top_k > 0 else 1.0
        c = self.per_layer
        return self.layers * (c.c0 * frac + c.a * tokens + c.b * pairs)

    def ms(self, tokens: int, pairs: float) -> float:
        return self.scale * self.modeled_ms(tokens, pairs)

    def observe(self, measured_ms: float, tokens: int, pairs: float, share: float = 1.0) -> None:
        """One measured step of `tokens` tokens and `pairs` causal pairs that ran `share` of the
        layers (stage 0 of several: its layers over all). The first sets the scale to its ratio of
        measured over modeled time; each later one moves the scale a fifth of the way (in log) to
        its ratio, clamped to within CALIBRATION_CLAMP of the scale."""
        want = self.modeled_ms(tokens, pairs) * share
        if tokens <= 0 or want <= 0 or not measured_ms > 0:
            return
        ratio = measured_ms / want
        if self.observed == 0:
            self.scale = ratio
        else:
            r = min(max(ratio / self.scale, 1 / CALIBRATION_CLAMP), CALIBRATION_CLAMP)
            self.scale *= r ** CALIBRATION_RATE
        self.observed += 1

    def fit_tokens(self, tokens: int, pairs: float, prefix: int, limit: int, bound_ms: float) -> int:
        """The most prefill tokens n <= limit of one chunk after `prefix` cached tokens that a
        micro-batch already holding (tokens, pairs) can add with ms() <= bound_ms (0 if none)."""
        def fits(n: int) -> bool:
            return self.ms(tokens + n, pairs + chunk_pairs(n, prefix)) <= bound_ms
        if limit <= 0 or not fits(1):
            return 0
        lo, hi = 1, limit  # fits(lo); ms grows with n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo


# StepBudget: a step's first chunk under max_step_ms must prefill at least this share of the tokens
# per modeled ms that the token budget's chunk would; below it the step's fixed cost (its decodes run
# eager beside a chunk, all experts read) swamps the chunk, and prompts would arrive faster than
# steps of a few tokens prefill them
MIN_PREFILL_EFFICIENCY = 0.25


class StepBudget:
    """The prefill tokens one micro-batch may still take under a bound: starts from the decodes
    it will carry, then each prefill chunk takes what keeps the modeled step within bound_ms.

    `over`: the bound leaves the step's first chunk so few tokens that it would prefill at less than
    MIN_PREFILL_EFFICIENCY of the token budget's chunk's rate (tokens per modeled ms), or none: no
    step carrying prefill keeps such a bound at a useful rate (a mixed step runs eager, without the
    decode graphs, and reads every expert). The step then takes its prefill at the token budget: a
    few over-bound steps with whole chunks rather than every step over it, or near it, by a block.
    Decodes are never dropped for prefill."""

    def __init__(self, cost: StepCost, bound_ms: float, decode_contexts: list[int]):
        self.cost, self.bound_ms = cost, bound_ms
        self.tokens = len(decode_contexts)
        self.pairs = float(sum(decode_contexts))
        self.prefilled = False
        self.over = False

    def _rate(self, m: int, prefix: int) -> float:
        """Prefill tokens per modeled ms of this step with a first chunk of m tokens after prefix."""
        return m / max(self.cost.ms(self.tokens + m, self.pairs + chunk_pairs(m, prefix)), 1e-9) if m else 0.0

    def take(self, prefix: int, n: int) -> int:
        """Tokens (<= n) granted to a prefill chunk after `prefix` cached tokens; recorded."""
        m = n if self.over else self.cost.fit_tokens(self.tokens, self.pairs, prefix, n, self.bound_ms)
        if not self.prefilled and m < n and self._rate(m, prefix) < MIN_PREFILL_EFFICIENCY * self._rate(n, prefix):
            self.over, m = True, n
        if m:
            self.tokens += m
            self.pairs += chunk_pairs(m, prefix)
            self.prefilled = True
        return m
