"""Forced tool calls (`tool_choice` "required" or a named function) as a grammar: whatever the random
"model" samples through the mask parses as Qwen3 tool calls, whole and streamed, with arguments that
validate against each function's schema; reasoning first when thinking is on."""
import json

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from engine.server.reasoning import split_reasoning
from engine.server.tool_parser import ToolCallStreamParser, parse_tool_calls
from engine.structured import GrammarCompiler, StructuredMatcher, tool_call_params
from tests.structured_util import (MODEL_VOCAB, STOP_ID, RandomModel, compiler, generate, tok,  # noqa: F401 (fixtures)
                                   tok_path, write_tiny_tokenizer)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "no_params"}},
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}



def check_calls(text: str) -> list:
    """The text is only tool calls; streamed in 3-character deltas it gives the same calls."""
    content, calls = parse_tool_calls(text)
    assert content is None, text
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    p = ToolCallStreamParser()
    deltas = [d for i in range(0, len(text), 3) for d in p.feed(text[i:i + 3])] + p.finish()
    assert not any("content" in d for d in deltas)
    assert [(c.name, c.arguments) for c in p.calls] == [(c.name, c.arguments) for c in calls]
    return calls


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_parses(compiler, tok, parallel):
    compiled = compiler.compile(tool_call_params(TOOLS, "required", parallel))
    counts = set()
    for seed in range(8):
        text = tok.decode(generate(StructuredMatcher(compiled), RandomModel(tok, seed)), skip_special_tokens=True)
        calls = check_calls(text)
        assert calls and (parallel or len(calls) == 1)
        counts.add(len(calls))
    assert parallel == (max(counts) > 1)  # the stop token's bonus still lets several calls through


@pytest.mark.parametrize("name", ["get_weather", "add", "no_params"])
def test_named_function_gives_one_call_of_it(compiler, tok, name):
    compiled = compiler.compile(tool_call_params(TOOLS, {"type": "function", "function": {"name": name}}))
    for seed in range(3):
        text = tok.decode(generate(StructuredMatcher(compiled), RandomModel(tok, seed)), skip_special_tokens=True)
        assert [c.name for c in check_calls(text)] == [name]
        assert text.startswith('<tool_call>\n{"name": "' + name + '", "arguments": ')


def test_reasoning_then_forced_call(compiler, tok):
    think_open, think_end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    compiled = compiler.compile(tool_call_params(TOOLS, {"type": "function", "function": {"name": "add"}}))
    m = StructuredMatcher(compiled, reasoning_end_id=think_end)
    ids = generate(m, RandomModel(tok, 4), forced={0: think_open, 1: 40, 2: 41, 3: think_end})
    reasoning, content = split_reasoning(tok.decode(ids, skip_special_tokens=True))
    assert reasoning == tok.decode([40, 41])
    assert [c.name for c in check_calls(content)] == ["add"]


@pytest.mark.parametrize("tools, choice, match", [
    ([], "required", "non-empty list"),
    (None, "required", "non-empty list"),
    ([{"type": "function", "function": {"name": "a b"}}], "required", r"tools\[0\].function.name"),
    ([{"type": "function", "function": {"name": 'a"'}}], "required", r"tools\[0\].function.name"),
    ([{"type": "retrieval"}], "required", r"tools\[0\] must be"),
    (TOOLS + TOOLS[:1], "required", "given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "required", "parameters must be"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "'missing', which is not in tools"),
    (TOOLS, {"type": "function"}, "None, which is not in tools"),
    (TOOLS, "always", "tool_choice must be"),
])
def test_bad_tools_or_choice_name_the_problem(tools, choice, match):
    with pytest.raises(ValueError, match=match):
        tool_call_params(tools, choice)


def test_auto_and_none_force_nothing():
    assert tool_call_params(TOOLS, "auto") is None and tool_call_params(TOOLS, "none") is None
    assert tool_call_params(TOOLS, None) is None


def test_bad_argument_schema_is_a_compile_error(compiler):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    with pytest.raises(ValueError, match="structural_tag: cannot compile: .*objekt"):
        compiler.compile(tool_call_params(bad, "required"))
