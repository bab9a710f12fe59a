"""Helpers for the structured-output tests: a tiny byte-level tokenizer (the project's own, written
offline) and a random-logit "model" that samples through the grammar mask."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.structured import StructuredMatcher, allocate_bitmask, apply_token_bitmask

TOKENIZER_VOCAB = 512  # the tiny preset's tokenizer
MODEL_VOCAB = 520  # the model's logit width: 8 padding ids past the tokenizer, as real checkpoints have
STOP_ID = 2  # <|im_end|>
CLOSERS = '"}],'  # tokens holding these get a logit bonus so random strings and arrays end


# ---- 20 JSON schemas: nested objects, arrays, enums, bounded integers, anyOf, $ref, ...
STR = {"type": "string"}
INT = {"type": "integer"}


def obj(props: dict, required: list | None = None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **kw}


DEEP: dict = {}
for _ in range(3000):
    DEEP = {"type": "array", "items": DEEP}

SCHEMAS = {
    "flat": obj({"name": STR, "age": INT}),
    "int_bounds": obj({"n": {"type": "integer", "minimum": -5, "maximum": 17}}),
    "int_exclusive": obj({"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 13}}),
    "number": obj({"x": {"type": "number"}, "ok": {"type": "boolean"}}),
    "enum": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, "xl", None]}}),
    "const": obj({"version": {"const": "v1"}, "n": INT}),
    "nested": obj({"user": obj({"id": INT, "address": obj({"city": STR, "zip": STR})})}),
    "array_of_str": obj({"tags": {"type": "array", "items": STR}}),
    "array_bounds": obj({"xs": {"type": "array", "items": INT, "minItems": 2, "maxItems": 4}}),
    "array_of_obj": obj({"items": {"type": "array", "items": obj({"k": STR, "v": INT}), "maxItems": 3}}),
    "anyOf": obj({"v": {"anyOf": [INT, STR, obj({"inner": {"type": "boolean"}})]}}),
    "oneOf_like_union": obj({"v": {"type": ["integer", "null"]}}),
    "optional_props": obj({"a": INT, "b": STR, "c": {"type": "boolean"}}, required=["a"]),
    "string_len": obj({"code": {"type": "string", "minLength": 3, "maxLength": 5}}),
    "pattern": obj({"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    "ref_defs": {"$defs": {"pt": obj({"x": INT, "y": INT})}, **obj({"a": {"$ref": "#/$defs/pt"},
                                                                    "b": {"$ref": "#/$defs/pt"}})},
    "top_array": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
    "additional_props": {"type": "object", "additionalProperties": INT, "maxProperties": 3},
    "tuple_prefix": obj({"pair": {"type": "array", "prefixItems": [STR, INT], "items": False}}),
    "deep": obj({"l1": obj({"l2": obj({"l3": obj({"leaf": {"enum": [True, False]}})})})}),
}


def closer_ids(tok, vocab: int) -> list[int]:
    """Ids of the tokens holding a closing character (a logit bonus on them ends random strings)."""
    return [i for i in range(vocab) if any(c in tok.decode([i], skip_special_tokens=False) for c in CLOSERS)]


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


# fixtures shared by the grammar test files (import them by name into the module)
@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("structured_tok"))


@pytest.fixture(scope="module")
def tok(tok_path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tok_path))


@pytest.fixture(scope="module")
def compiler(tok_path):
    from engine.structured import GrammarCompiler
    return GrammarCompiler(tok_path, MODEL_VOCAB, [STOP_ID])
