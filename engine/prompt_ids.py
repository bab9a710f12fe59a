"""A prompt (text or token ids) as checked token ids."""
from __future__ import annotations


def encode_prompt(prompt: str | list[int], tokenizer, vocab_size: int) -> list[int]:
    """Text through the checkpoint's tokenizer, or ids checked against the vocabulary; never empty."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: give prompts as lists of token ids")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if not ids:
        raise ValueError("empty prompt: give at least one token")
    return ids
