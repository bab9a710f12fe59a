"""The LLM's checks of a request before any stage sees it: the prompt as token ids, and limits and
params that could never run."""
from __future__ import annotations

from .params import SamplingParams
from .runtime.scheduler import check_request


def encode_prompt(prompt: str | list[int], tokenizer, vocab_size: int) -> list[int]:
    """Text through the checkpoint's tokenizer, or ids checked against the vocabulary; never empty."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: give prompts as lists of token ids")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        if not valid_ids(ids, vocab_size):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if not ids:
        raise ValueError("empty prompt: give at least one token")
    return ids


def valid_ids(ids: list, vocab_size: int) -> bool:
    """Every id an int (not a bool) in [0, vocab_size): the types tested once per distinct type and
    the range by min and max, loops in C rather than a Python test per id (a 128k-token prompt)."""
    if not all(issubclass(t, int) and not issubclass(t, bool) for t in set(map(type, ids))):
        return False
    return not ids or (min(ids) >= 0 and max(ids) < vocab_size)


def prompt_list(prompts, params) -> tuple[list, list[SamplingParams]]:
    """generate()'s prompts as a list (one prompt: text or ids) and one SamplingParams per prompt."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    params = params if params is not None else SamplingParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
    for sp in plist:
        if not isinstance(sp, SamplingParams):  # as vLLM: a dict is not taken for SamplingParams(**dict)
            raise TypeError(f"params must be SamplingParams or a list of them, got {type(sp).__name__}")
    return list(prompts), plist


def check_params(ids: list[int], params: SamplingParams, max_model_len: int, info: dict, vocab_size: int,
                 tokenizer) -> None:
    """Refuse (ValueError naming the limit or field) a request that could never run."""
    check_request(len(ids), params.max_tokens, max_model_len, info["num_blocks"], info["block_size"])
    params.check_vocab(vocab_size)
    if params.stop is not None and tokenizer is None:
        raise ValueError("SamplingParams: stop strings need the checkpoint's tokenizer.json")
