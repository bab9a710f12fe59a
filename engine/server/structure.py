"""What a request's `response_format`, `tools`, `tool_choice` and `parallel_tool_calls` ask of the
engine: the grammar (StructuredOutputsParams, vLLM's names) and whether the output is parsed for
tool calls. A bad combination is a BadRequest naming the field."""
from __future__ import annotations

from dataclasses import dataclass

from ..structured.params import StructuredOutputsParams
from ..structured.tool_grammar import tool_call_params
from .protocol import BadRequest


@dataclass(frozen=True)
class Structure:
    grammar: StructuredOutputsParams | None  # the engine's structured_outputs
    param: str | None  # the request field the grammar comes from (named in a compile error)
    parse_tools: bool  # the output is parsed for Qwen3 tool calls
    single_call: bool  # parallel_tool_calls false: at most one call is returned


def response_format_grammar(rf) -> StructuredOutputsParams | None:
    """json_object: any JSON object; json_schema: its schema (strict or not, the grammar holds it)."""
    if rf is None or rf.type == "text":
        return None
    try:
        if rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        schema = rf.json_schema.schema_
        return StructuredOutputsParams(json=schema if schema is not None else {"type": "object"})
    except ValueError as e:
        raise BadRequest(f"response_format: {e}", "response_format") from None


def structure_of(req) -> Structure:
    """A chat or completions request's Structure (completions have no tools)."""
    tools, choice = getattr(req, "tools", None), getattr(req, "tool_choice", None)
    parallel = getattr(req, "parallel_tool_calls", None) is not False
    rf = req.response_format
    forced = tools is not None and choice not in (None, "auto", "none")
    if choice not in (None, "auto", "none") and tools is None:
        raise BadRequest("tool_choice: give tools to choose from", "tool_choice")
    if forced:
        if rf is not None and rf.type != "text":
            raise BadRequest("response_format cannot be combined with a forced tool_choice", "response_format")
        named = choice if isinstance(choice, str) else choice.model_dump()
        try:
            grammar = tool_call_params([t.model_dump(by_alias=True) for t in tools], named, parallel)
        except ValueError as e:
            raise BadRequest(str(e), "tool_choice") from None
        return Structure(grammar, "tools", True, not parallel or not isinstance(choice, str))
    return Structure(response_format_grammar(rf), "response_format", tools is not None and choice != "none",
                     not parallel)


def check_grammar(llm, params, param: str | None) -> None:
    """Compile params.structured_outputs now (on the server's thread pool; LLM.submit then finds it
    cached): a schema xgrammar cannot compile, or xgrammar missing, is a 400 naming the field."""
    try:
        llm.grammars.payload(params.structured_outputs)
    except (ValueError, ImportError) as e:
        raise BadRequest(f"{param}: {e}" if param else str(e), param) from None
