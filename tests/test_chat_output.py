"""engine.server.chat_output and engine.server.structure: a chat output's text as OpenAI message
fields (reasoning split, tool calls parsed) whole and as streamed deltas that reassemble to the same
fields at every split point; what response_format / tools / tool_choice ask of the grammar."""
import json
import itertools

import pytest

from engine.server.chat_output import ChatDeltas, chat_message, finish_reason
from engine.server.protocol import BadRequest, ChatCompletionRequest, CompletionRequest
from engine.server.structure import structure_of

CALL = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\" </tool_call>"}}\n</tool_call>'
CASES = {  # text, thinking, tools -> (reasoning, content, [(name, arguments)])
    "plain": ("Hello there.", False, False, (None, "Hello there.", [])),
    "thinking_then_answer": ("<think>hmm</think>\n\nHi", True, False, ("hmm", "\n\nHi", [])),
    "thinking_off_keeps_tags": ("<think>hmm</think>Hi", False, False, (None, "<think>hmm</think>Hi", [])),
    "truncated_thinking": ("<think>still", True, True, ("still", None, [])),
    "call_after_thinking": ("<think>use a tool</think>\n\n" + CALL, True, True,
                            ("use a tool", None, [("get_time", {"tz": "UTC"})])),
    "two_calls_and_text": ("Sure.\n" + CALL + "\n" + CALL2, False, True,
                           (None, "Sure.", [("get_time", {"tz": "UTC"}),
                                            ("get_weather", {"city": 'Paris, "FR" </tool_call>'})])),
    "malformed_call_stays": ("<tool_call>{not json}</tool_call> ok", False, True,
                             (None, "<tool_call>{not json}</tool_call> ok", [])),
    "tools_not_parsed_without_tools": (CALL, False, False, (None, CALL, [])),
}


def fields(msg: dict) -> tuple:
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])]
    return msg.get("reasoning_content"), msg["content"], calls


@pytest.mark.parametrize("name", sorted(CASES))
def test_message_whole_and_streamed_at_every_split(name):
    text, thinking, tools, want = CASES[name]
    msg, called = chat_message(text, thinking, tools)
    assert fields(msg) == want and called == bool(want[2]) and msg["role"] == "assistant"
    cuts = [[i] for i in range(len(text) + 1)] + [list(range(0, len(text), 3))]
    cuts += [sorted(c) for c in itertools.combinations(range(0, len(text), max(1, len(text) // 7)), 2)]
    for cut in cuts:
        d = ChatDeltas(thinking, tools)
        out, prev = [], 0
        for c in cut + [len(text)]:
            out += d.feed(text[prev:c])
            prev = c
        out += d.finish()
        reasoning = "".join(x.get("reasoning_content", "") for x in out) or None
        content = "".join(x.get("content", "") for x in out) or None
        calls: dict[int, dict] = {}
        for x in out:
            for tc in x.get("tool_calls", []):
                e = calls.setdefault(tc["index"], {"name": tc["function"].get("name"), "arguments": ""})
                e["arguments"] += tc["function"]["arguments"]
        got = (reasoning, content, [(e["name"], json.loads(e["arguments"])) for e in calls.values()])
        assert got == want, cut
        assert d.called == bool(want[2])


def test_single_call_keeps_the_first_only():
    text = CALL + "\n" + CALL2
    msg, _ = chat_message(text, False, True, single_call=True)
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_time"]
    d = ChatDeltas(False, True, single_call=True)
    out = d.feed(text) + d.finish()
    assert {tc["index"] for x in out for tc in x.get("tool_calls", [])} == {0}


def test_finish_reason():
    assert finish_reason("stop", True) == "tool_calls"
    assert finish_reason("length", True) == "length"  # cut short: the caller sees it was truncated
    assert finish_reason("stop", False) == "stop"


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}}}}}, {"type": "function", "function": {"name": "g"}}]
M = [{"role": "user", "content": "x"}]


def chat_req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": M, **kw})


def test_structure_of_requests():
    s = structure_of(chat_req())
    assert s.grammar is None and not s.parse_tools
    s = structure_of(chat_req(tools=TOOLS))  # tool_choice absent with tools: auto
    assert s.grammar is None and s.parse_tools and not s.single_call
    assert not structure_of(chat_req(tools=TOOLS, tool_choice="none")).parse_tools
    s = structure_of(chat_req(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    tag = json.loads(s.grammar.structural_tag)["format"]
    assert s.param == "tools" and s.parse_tools and s.single_call and tag["stop_after_first"]
    assert [t["begin"].split('"')[3] for t in tag["tags"]] == ["f", "g"]
    s = structure_of(chat_req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}))
    assert json.loads(s.grammar.structural_tag)["format"]["begin"].endswith('"g", "arguments": ')
    s = structure_of(chat_req(response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object"}, "strict": True}}))
    assert s.grammar.json == {"type": "object"} and s.param == "response_format"
    assert structure_of(chat_req(response_format={"type": "json_object"})).grammar.json_object
    assert structure_of(chat_req(response_format={"type": "text"})).grammar is None
    c = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}})
    assert structure_of(c).grammar.json_object and not structure_of(c).parse_tools


@pytest.mark.parametrize("kw, param, match", [
    ({"tool_choice": "required"}, "tool_choice", "give tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "h"}}}, "tool_choice", "not in tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined"),
])
def test_structure_refusals_name_the_field(kw, param, match):
    with pytest.raises(BadRequest, match=match) as e:
        structure_of(chat_req(**kw))
    assert e.value.param == param
