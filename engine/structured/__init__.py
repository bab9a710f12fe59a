"""Structured output: request params, grammars compiled through xgrammar (lazily imported), per-request
matchers, the batched bitmask, and forced Qwen3 tool calls as a grammar. Names are imported on first
use, so that engine/params.py can use StructuredOutputsParams without importing torch."""
from __future__ import annotations

from ..lazy import lazy_getattr

_EXPORTS = {
    "allowed_mask": ".bitmask", "apply_token_bitmask": ".bitmask",
    "INSTALL_HINT": ".compiler", "GrammarCompiler": ".compiler", "import_xgrammar": ".compiler",
    "ALL_ALLOWED": ".matcher", "StructuredMatcher": ".matcher", "allocate_bitmask": ".matcher",
    "bitmask_width": ".matcher",
    "StructuredOutputsParams": ".params",
    "function_schemas": ".tool_grammar", "tool_call_params": ".tool_grammar",
    "GrammarPayload": ".requests", "GrammarRequests": ".requests",
    "GrammarRows": ".rows",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
