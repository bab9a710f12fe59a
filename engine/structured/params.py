"""StructuredOutputsParams: what a request asks its output to match (vLLM's names), validated at the
edge so that a bad request is a ValueError naming the field before any grammar is compiled."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# vLLM's field names; `structural_tag` (an xgrammar structural tag, JSON) is how tool calls are forced
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
MAX_SPEC_CHARS = 1 << 20  # a schema / regex / grammar larger than this is refused before compiling
# JSON nested deeper than this is refused: compile time grows fast with depth, and Python's own
# recursion limit would otherwise turn a deep schema into a RecursionError instead of a clear error
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, dict or JSON text), `regex`, `choice` (non-empty list of
    strings), `grammar` (EBNF, xgrammar's dialect), `json_object=True` (any JSON object), or
    `structural_tag` (JSON text of an xgrammar structural tag). `disable_any_whitespace` makes JSON
    compact (`, ` and `: ` separators, no newlines) instead of allowing any whitespace between tokens."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: give exactly one of " + ", ".join(KINDS)
                             + (f" (got {', '.join(given)})" if given else " (got none)"))
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be a bool")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            schema = _parse_json("json", value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs.json must be a JSON schema object (a dict or its JSON text), "
                                 f"got {type(value).__name__}")
            _check_depth("json", schema)
            _check_size("json", json.dumps(schema))
            object.__setattr__(self, "json", schema)
        elif kind == "json_object":
            if value is not True:
                raise ValueError(f"structured_outputs.json_object must be true, got {value!r}")
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            for i, c in enumerate(value):
                if not isinstance(c, str) or not c:
                    raise ValueError(f"structured_outputs.choice[{i}] must be a non-empty string, got {c!r}")
            _check_size("choice", "".join(value))
            object.__setattr__(self, "choice", list(value))
        else:  # regex, grammar, structural_tag: non-empty text
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"structured_outputs.{kind} must be a non-empty string, got {value!r}")
            _check_size(kind, value)
            if kind == "structural_tag" and not isinstance(_parse_json(kind, value), dict):
                raise ValueError("structured_outputs.structural_tag must be a JSON object")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple[str, str, bool]:
        """Equal for requests that compile to the same grammar (dict key order does not matter)."""
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return self.kind, text, self.disable_any_whitespace

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StructuredOutputsParams":
        """From an API payload (unknown keys are an error naming them)."""
        if not isinstance(d, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(KINDS) - {"disable_any_whitespace"})
        if unknown:
            raise ValueError(f"structured_outputs: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


def _parse_json(field: str, text: str) -> Any:
    _check_size(field, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"structured_outputs.{field} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"structured_outputs.{field} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_depth(field, value)
    return value


def _check_depth(field: str, value: Any) -> None:
    """Iterative (a deep value must not hit Python's recursion limit here)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"structured_outputs.{field} is nested deeper than {MAX_JSON_DEPTH} levels")
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _check_size(field: str, text: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"structured_outputs.{field} is {len(text)} characters, over the limit of {MAX_SPEC_CHARS}")
