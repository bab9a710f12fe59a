"""SamplingParams (validated at construction; vLLM's names and semantics), RequestOutput and its
CompletionOutputs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20  # most top logprobs per token (the OpenAI API's top_logprobs limit)
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's eos ids
    ignore_eos: bool = False
    # n samples of the prompt, as separate sequences; sample i is seeded seed + i (seed None: each
    # its own engine-derived seed)
    n: int = 1
    # penalties on the raw logits, as vLLM: presence subtracts p once from every token generated so
    # far, frequency subtracts f x its count; repetition divides positive logits of tokens in the
    # prompt or the output by r and multiplies negative ones (1 = off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = field(default=None, hash=False)  # token id -> added to its logit
    min_tokens: int = 0  # the stop tokens (and stop strings) are ignored until this many outputs
    logprobs: int | None = None  # k: each output token's logprob, its rank and the top-k (0: the token only)
    prompt_logprobs: int | None = None  # k: each prompt token's logprob given its prefix (first: None)
    # which distribution logprobs describe: None = the engine's EngineOptions.logprobs_mode;
    # "raw_logprobs": log_softmax of the model's logits; "processed_logprobs": of the logits the
    # sampler draws from (after penalties, bias, temperature and top-k/top-p/min-p)
    logprobs_mode: str | None = None
    stop: tuple[str, ...] | None = field(default=None, hash=False)  # output text ends before the first of these
    include_stop_str_in_output: bool = False
    # the output must match this (a JSON schema, regex, choice, ...); a dict is read with
    # StructuredOutputsParams.from_dict. Compiled by the LLM at submit, masked in the sampler
    structured_outputs: StructuredOutputsParams | None = field(default=None, hash=False)

    def __post_init__(self):
        def bad(name: str, msg: str):
            raise ValueError(f"SamplingParams: {name} {msg}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            bad("top_k", f"must be an integer in [0, 2^31) (0 = off), got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", f"must be an integer or None, got {self.seed!r}")
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not all(_is_int(i) and i >= 0 for i in ids):
                bad("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", ids)
        if not _is_int(self.n) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                bad(name, f"must be in [-2, 2], got {v!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", f"must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            bias = {}
            for k, v in self.logit_bias.items():
                tok = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k  # JSON keys
                if not _is_int(tok) or tok < 0:
                    bad("logit_bias", f"keys must be token ids >= 0, got {k!r}")
                if not _is_num(v) or not -100 <= v <= 100:
                    bad("logit_bias", f"values must be in [-100, 100], got {v!r} for token {k!r}")
                bias[tok] = float(v)
            object.__setattr__(self, "logit_bias", bias or None)
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens:
            bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be an integer in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        if self.logprobs_mode is not None and self.logprobs_mode not in LOGPROBS_MODES:
            bad("logprobs_mode", f"must be one of {', '.join(LOGPROBS_MODES)} or None, got {self.logprobs_mode!r}")
        if self.stop is not None:
            stop = (self.stop,) if isinstance(self.stop, str) else self.stop
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
                bad("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
            object.__setattr__(self, "stop", tuple(stop) or None)
        so = self.structured_outputs
        if isinstance(so, dict):
            object.__setattr__(self, "structured_outputs", StructuredOutputsParams.from_dict(so))
        elif so is not None and not isinstance(so, StructuredOutputsParams):
            bad("structured_outputs", f"must be StructuredOutputsParams, a dict of its fields or None, "
                f"got {type(so).__name__}")

    def samples(self) -> list["SamplingParams"]:
        """The n samples as n = 1 requests: sample i is seeded seed + i (as vLLM's parallel
        sampling); without a seed each gets its own engine-derived seed."""
        if self.n == 1:
            return [self]
        return [replace(self, n=1, seed=None if self.seed is None else (self.seed + i) % 2**64)
                for i in range(self.n)]

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalty: the last stage keeps the token counts."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming logit_bias if a token id is past the vocabulary (at submit)."""
        bad = [t for t in (self.logit_bias or {}) if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams: logit_bias token id {bad[0]} is not in the vocabulary [0, {vocab_size})")


class Logprob(NamedTuple):
    logprob: float
    rank: int  # 1 + the number of tokens with a greater logprob


@dataclass
class CompletionOutput:
    """One of a request's n samples (vLLM's CompletionOutput). logprobs: per output token, a dict
    token id -> (logprob, rank) holding the sampled token and the top-k (None unless asked)."""
    index: int
    text: str | None
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's result. The top-level token_ids / text / finish_reason are outputs[0]'s.
    prompt_logprobs: per prompt token, None for the first, then a dict token id -> (logprob, rank)
    with that token and the top-k (None unless asked)."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" | "length"
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
