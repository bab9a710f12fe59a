"""Structured output: request params, grammars compiled through xgrammar (lazily imported), per-request
matchers, the batched bitmask, and forced Qwen3 tool calls as a grammar."""
from engine.structured.bitmask import allowed_mask, apply_token_bitmask
from engine.structured.compiler import INSTALL_HINT, GrammarCompiler, import_xgrammar
from engine.structured.matcher import ALL_ALLOWED, StructuredMatcher, allocate_bitmask, bitmask_width
from engine.structured.params import StructuredOutputsParams
from engine.structured.tool_grammar import function_schemas, tool_call_params

__all__ = ["ALL_ALLOWED", "INSTALL_HINT", "GrammarCompiler", "StructuredMatcher", "StructuredOutputsParams",
           "allocate_bitmask", "allowed_mask", "apply_token_bitmask", "bitmask_width", "function_schemas",
           "import_xgrammar", "tool_call_params"]
