"""`tool_choice` "required" or a named function as a grammar: the output is Qwen3's
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (one call, or several separated by "\n"
when parallel_tool_calls), each call's arguments held to its function's JSON schema."""
from __future__ import annotations

import json
import re
from typing import Any

from engine.structured.params import StructuredOutputsParams

CALL_BEGIN = '<tool_call>\n{"name": "'
ARGUMENTS_KEY = '", "arguments": '
CALL_END = "}\n</tool_call>"
CALL_SEPARATOR = "\n"  # between parallel calls, as Qwen3's chat template renders them
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule (plus '.'); no JSON escaping needed
ANY_OBJECT = {"type": "object"}


def function_schemas(tools: Any) -> dict[str, dict]:
    """{name: parameters schema} from OpenAI `tools`; a ValueError naming the bad entry."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {type: function, function: {...}} objects")
    out: dict[str, dict] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must match {FUNCTION_NAME.pattern}, got {name!r}")
        if name in out:
            raise ValueError(f"tools[{i}].function.name {name!r} is given twice")
        params = fn.get("parameters")
        if params is None:
            params = ANY_OBJECT
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out[name] = params
    return out


def _call_tag(name: str, schema: dict) -> dict:
    return {"type": "tag", "begin": CALL_BEGIN + name + ARGUMENTS_KEY,
            "content": {"type": "json_schema", "json_schema": schema}, "end": CALL_END}


def tool_call_params(tools: Any, tool_choice: Any, parallel_tool_calls: bool = True
                     ) -> StructuredOutputsParams | None:
    """The grammar that forces tool calls, or None when nothing is forced ("auto", "none", absent).

    "required": at least one call of any tool (exactly one unless parallel_tool_calls);
    {"type": "function", "function": {"name": N}}: exactly one call of N."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    schemas = function_schemas(tools)
    if tool_choice == "required":
        tags = [_call_tag(n, s) for n, s in schemas.items()]
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": CALL_SEPARATOR,
               "at_least_one": True, "stop_after_first": not parallel_tool_calls}
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in schemas:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                             f"({', '.join(sorted(schemas))})")
        fmt = _call_tag(name, schemas[name])
    else:
        raise ValueError("tool_choice must be 'auto', 'none', 'required' or "
                         f"{{type: function, function: {{name}}}}, got {tool_choice!r}")
    return StructuredOutputsParams(structural_tag=json.dumps({"type": "structural_tag", "format": fmt}))
