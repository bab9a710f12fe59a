"""engine.server.tool_parser against hand-written Qwen3 outputs: one call, two calls, malformed calls,
a call after thinking, text around calls; streamed deltas at every split point reassemble exactly."""
import json

import pytest

from engine.server.reasoning import split_reasoning
from engine.server.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls


def ids():
    n = iter(range(1000))
    return lambda: f"call_{next(n)}"


def merge(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """What a client does with the stream: join content, and per index the id, name, arguments."""
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and len(d) == 1
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:  # only the first chunk of a call names it
                assert c["id"] is None and tc["type"] == "function"
                c["id"], c["name"] = tc["id"], tc["function"]["name"]
            c["arguments"] += tc["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content or None, [calls[i] for i in sorted(calls)]


def stream(text: str, cuts: list[int]) -> list[dict]:
    p = ToolCallStreamParser(ids())
    out, prev = [], 0
    for c in cuts + [len(text)]:
        out += p.feed(text[prev:c])
        prev = c
    return out + p.finish()


W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
A = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "日本"}]}}\n</tool_call>'
CASES = {
    "one_call": (W, None, [("get_weather", {"city": "Paris"})]),
    "two_calls": (W + "\n" + A, None, [("get_weather", {"city": "Paris"}),
                                       ("add", {"a": 1, "b": [2, {"c": "日本"}]})]),
    "text_around": ("Let me check.\n\n" + W + "\nAnd then:\n" + A + "\n  done ",
                    "Let me check.\n\n\nAnd then:\n\n  done", [("get_weather", {"city": "Paris"}),
                                                             ("add", {"a": 1, "b": [2, {"c": "日本"}]})]),
    "malformed_json": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>', []),
    "malformed_then_valid": ("<tool_call>{'name': 'x'}</tool_call>\n" + W,
                             "<tool_call>{'name': 'x'}</tool_call>", [("get_weather", {"city": "Paris"})]),
    "no_arguments_object": ('<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
                            '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>', []),
    "not_an_object": ("<tool_call>[1, 2]</tool_call> ok", "<tool_call>[1, 2]</tool_call> ok", []),
    "unclosed_at_end": ('Hi <tool_call>\n{"name": "f", "arguments": {}}\n', "Hi", [("f", {})]),
    "unclosed_invalid": ('Hi <tool_call>\n{"name": "f", "argu', 'Hi <tool_call>\n{"name": "f", "argu', []),
    "parameters_alias": ('<tool_call>{"name": "f", "parameters": {"x": null}}</tool_call>', None, [("f", {"x": None})]),
    "plain_text": ("Just <tool text, no call. <tool_cal", "Just <tool text, no call. <tool_cal", []),
    "whitespace_only": ("  \n ", None, []),
    "empty": ("", None, []),
    "close_tag_in_argument": ('<tool_call>{"name": "say", "arguments": {"s": "</tool_call> \\"</tool_call>"}}'
                              '</tool_call> after', "after", [("say", {"s": '</tool_call> "</tool_call>'})]),
    "escaped_backslash_then_close": ('<tool_call>{"name": "p", "arguments": {"s": "C:\\\\"}}</tool_call>',
                                     None, [("p", {"s": "C:\\"})]),
    "nested_open_tag": ('<tool_call>x <tool_call>{"name": "f", "arguments": {}}</tool_call>',
                        '<tool_call>x <tool_call>{"name": "f", "arguments": {}}</tool_call>', []),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_hand_written_outputs(name):
    text, want_content, want_calls = CASES[name]
    content, calls = parse_tool_calls(text, ids())
    assert content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls
    assert [c.id for c in calls] == [f"call_{i}" for i in range(len(calls))]


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_at_every_split_point_equals_whole(name):
    text = CASES[name][0]
    want_content, want_calls = parse_tool_calls(text, ids())
    want = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in want_calls]
    for cut in range(len(text) + 1):
        assert merge(stream(text, [cut])) == (want_content, want), cut
    for step in (1, 2, 3, 7):  # many small deltas, as tokens arrive
        assert merge(stream(text, list(range(step, len(text), step)))) == (want_content, want), step


def test_stream_sends_a_call_once_it_closes_and_text_before_it():
    p = ToolCallStreamParser(ids())
    assert p.feed("Sure: <tool") == [{"content": "Sure:"}]
    assert p.feed('_call>{"name": "f", "arguments": {"k": 1}}') == []
    assert p.feed("</tool_call>") == [
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"k": 1}'}}]}]
    assert p.finish() == [] and p.calls == [ToolCall("call_0", "f", '{"k": 1}')]


def test_call_after_thinking():
    """The reasoning split runs first; the calls are parsed from the content after </think>."""
    out = "<think>\nShould I call <tool_call>? Yes.\n</think>\n\n" + W
    reasoning, content = split_reasoning(out)
    assert reasoning == "\nShould I call <tool_call>? Yes.\n"
    text, calls = parse_tool_calls(content)
    assert text is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert calls[0].id.startswith("call_") and calls[0].to_openai()["function"]["name"] == "get_weather"
    assert len({parse_tool_calls(W)[1][0].id for _ in range(5)} | {calls[0].id}) > 1  # fresh ids


def test_parses_what_the_chat_template_renders():
    """An assistant turn with calls, rendered by Qwen3's template, parses back to the same calls and
    reasoning (the format the model is trained on is the one the parsers read)."""
    from engine.tools.chat_template import ChatTemplate
    from loader.presets import QWEN3_CHAT_TEMPLATE
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": "</tool_call>"}'}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"y": [1, "é"]}}}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "Two calls.", "reasoning_content": "plan", "tool_calls": calls}]
    text = ChatTemplate({"default": QWEN3_CHAT_TEMPLATE}, {}).render(msgs, add_generation_prompt=False)
    turn = text.split("<|im_start|>assistant\n")[1].removesuffix("<|im_end|>\n")
    reasoning, content = split_reasoning(turn)
    assert reasoning == "\nplan\n"
    assert parse_tool_calls(content, ids()) == ("Two calls.", [ToolCall("call_0", "f", '{"x": "</tool_call>"}'),
                                                               ToolCall("call_1", "g", '{"y": [1, "é"]}')])
