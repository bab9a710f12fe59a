"""Helpers for the structured-output tests: a tiny byte-level tokenizer (the project's own, written
offline) and a random-logit "model" that samples through the grammar mask."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.structured import StructuredMatcher, allocate_bitmask, apply_token_bitmask

TOKENIZER_VOCAB = 512  # the tiny preset's tokenizer
MODEL_VOCAB = 520  # the model's logit width: 8 padding ids past the tokenizer, as real checkpoints have
STOP_ID = 2  # <|im_end|>
CLOSERS = '"}],'  # tokens holding these get a logit bonus so random strings and arrays end


def write_tiny_tokenizer(folder: Path) -> Path:
    from loader.writer import write_tokenizer
    write_tokenizer(folder, TOKENIZER_VOCAB)
    return folder / "tokenizer.json"


class RandomModel:
    """Seeded random logits with a bonus for closing characters and the stop token."""

    def __init__(self, tok, seed: int, vocab: int = MODEL_VOCAB, bonus: float = 3.0):
        texts = [tok.decode([i], skip_special_tokens=False) if i < TOKENIZER_VOCAB else "" for i in range(vocab)]
        self.bias_V = torch.tensor([bonus if any(c in t for c in CLOSERS) else 0.0 for t in texts])
        self.bias_V[STOP_ID] = bonus
        self.g = torch.Generator().manual_seed(seed)
        self.vocab = vocab

    def logits(self, rows: int = 1) -> torch.Tensor:
        return torch.randn(rows, self.vocab, generator=self.g) * 2 + self.bias_V

    def sample(self, logits_RV: torch.Tensor) -> list[int]:
        return torch.multinomial(torch.softmax(logits_RV, -1), 1, generator=self.g)[:, 0].tolist()


def generate(matcher: StructuredMatcher, model: RandomModel, max_steps: int = 800,
             forced: dict[int, int] | None = None) -> list[int]:
    """Sample through the mask until the grammar terminates; the ids before the stop token.
    `forced` {step: token} overrides the model (used to end reasoning with `</think>`)."""
    bitmask = allocate_bitmask(1, model.vocab)
    out: list[int] = []
    for step in range(max_steps):
        if forced and step in forced:
            token = forced[step]
        else:
            matcher.fill_bitmask(bitmask, 0)
            token = model.sample(apply_token_bitmask(model.logits(), bitmask))[0]
        assert matcher.accept(token), f"the matcher refused sampled token {token} at step {step}"
        if matcher.is_terminated:
            assert token == STOP_ID
            return out
        out.append(token)
    raise AssertionError(f"no stop within {max_steps} tokens")
