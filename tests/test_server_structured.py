"""Structured output, tool calls and reasoning through the server on the tiny preset (CPU, one
stage), driven by the official `openai` client and LangChain's ChatOpenAI: response_format
json_schema / json_object on chat and completions (streamed and not) always parse and validate,
forced tool calls (required, named, parallel or not) parse streamed and not with finish_reason
"tool_calls", `auto` leaves the random model's text in content, reasoning_content is split only
with thinking on, and an uncompilable schema is a 400 naming response_format before any stage
sees it."""
import json
import re
from typing import Literal

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from loader.presets import preset_config
from loader.writer import write_checkpoint
from server_util import MODEL_NAME, start_server

OFF = {"chat_template_kwargs": {"enable_thinking": False}}  # the random model never closes a `<think>`
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "rain": {"type": "boolean"}},
           "required": ["city", "days", "rain"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = write_checkpoint(tmp_path_factory.mktemp("tiny_structured_serve"), preset_config("tiny"), seed=7)
    # the tools make Qwen3's template prompt ~550 tokens
    with start_server(tiny, tmp_path_factory.mktemp("serve_log"), "--stages", "1", "--max-model-len", "2048") as s:
        yield s.wait_ready()


def chat(server, **kw):
    return server.client().chat.completions.create(model=MODEL_NAME, messages=kw.pop("messages", ASK),
                                                   max_tokens=kw.pop("max_tokens", 300),
                                                   temperature=kw.pop("temperature", 1.0), **kw)


def test_response_format_json_schema_and_object(server):
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for seed in range(4):
        r = chat(server, seed=seed, response_format=rf, extra_body=OFF)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
        chunks = list(chat(server, seed=seed, response_format=rf, extra_body=OFF, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content  # seeded: the same output streamed
    r = chat(server, seed=1, response_format={"type": "json_object"}, extra_body=OFF)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # the openai client's parse() helper reads the JSON back into its own type
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: Literal["Paris", "Rome", "Oslo"]
        days: int
        rain: bool
    parsed = server.client().beta.chat.completions.parse(model=MODEL_NAME, messages=ASK, max_tokens=300,
                                                        temperature=1.0, seed=2, response_format=Weather,
                                                        extra_body=OFF)
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    # completions take response_format too (as vLLM's)
    c = server.client().completions.create(model=MODEL_NAME, prompt="Weather:", max_tokens=300, temperature=1.0,
                                           seed=3, extra_body={"response_format": rf})
    jsonschema.validate(json.loads(c.choices[0].text), WEATHER)


def _check_calls(calls, names: set[str]):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("tool_choice, parallel, names", [
    ("required", None, {"get_weather", "get_time"}),
    ("required", False, {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"get_weather"}),
])
def test_forced_tool_calls_parse_streamed_and_not(server, tool_choice, parallel, names):
    kw = dict(tools=TOOLS, tool_choice=tool_choice, extra_body=OFF)
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    for seed in range(3):
        r = chat(server, seed=seed, **kw)
        m = r.choices[0]
        assert m.finish_reason == "tool_calls" and m.message.content is None
        _check_calls(m.message.tool_calls, names)
        if parallel is False or isinstance(tool_choice, dict):
            assert len(m.message.tool_calls) == 1
        chunks = [c for c in chat(server, seed=seed, stream=True, **kw) if c.choices]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not any(c.choices[0].delta.content for c in chunks)
        calls: dict[int, dict] = {}  # joined as OpenAI's clients join the deltas
        for c in chunks:
            for d in c.choices[0].delta.tool_calls or []:
                e = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                e["arguments"] += d.function.arguments or ""
        assert [(e["name"], json.loads(e["arguments"])) for e in calls.values()] == \
            [(t.function.name, json.loads(t.function.arguments)) for t in m.message.tool_calls]


def test_auto_and_none_leave_text_in_content(server):
    for choice in ("auto", "none"):
        r = chat(server, seed=0, max_tokens=12, tools=TOOLS, tool_choice=choice, extra_body=OFF)
        m = r.choices[0]
        assert m.message.tool_calls is None and m.message.content and m.finish_reason == "length"


def test_reasoning_content_only_with_thinking_on(server):
    on = chat(server, seed=0, max_tokens=10, temperature=0)
    off = chat(server, seed=0, max_tokens=10, temperature=0, extra_body=OFF)
    # thinking on: the output never closes its thinking, so it is all reasoning; off: all content
    assert on.choices[0].message.reasoning_content and on.choices[0].message.content is None
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None
    chunks = [c for c in chat(server, seed=0, max_tokens=10, temperature=0, stream=True) if c.choices]
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == \
        on.choices[0].message.reasoning_content


@pytest.mark.parametrize("body, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}}, "response_format: .*cannot compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
      "tools": TOOLS, "tool_choice": "required"}, "cannot be combined"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
])
def test_bad_structure_is_a_400_before_any_stage(server, body, match):
    before = server.metrics()["moepipe:prompt_tokens_total"]
    r = server.post("/v1/chat/completions", {"model": MODEL_NAME, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and re.search(match, err["message"])
    assert server.metrics()["moepipe:prompt_tokens_total"] == before


def test_langchain_bind_tools_and_structured_output(server):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    llm = lc.ChatOpenAI(model=MODEL_NAME, base_url=server.url + "/v1", api_key="unused", temperature=1.0, seed=4,
                        max_tokens=300, max_retries=0, extra_body=OFF)

    class GetWeather(BaseModel):
        """Get the weather of a city."""
        city: Literal["Paris", "Rome", "Oslo"]
        days: int = Field(ge=1, le=7)

    msg = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Paris for 3 days?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "GetWeather"
    GetWeather(**msg.tool_calls[0]["args"])  # the arguments validate against the tool's model

    class Forecast(BaseModel):
        city: Literal["Paris", "Rome", "Oslo"]
        days: int = Field(ge=1, le=7)
        rain: bool

    out = llm.with_structured_output(Forecast).invoke("Forecast for Oslo?")
    assert isinstance(out, Forecast) and 1 <= out.days <= 7
    streamed = list(llm.bind_tools([GetWeather], tool_choice="GetWeather").stream("Weather in Rome?"))
    joined = streamed[0]
    for chunk in streamed[1:]:
        joined += chunk
    assert joined.tool_calls[0]["name"] == "GetWeather" and GetWeather(**joined.tool_calls[0]["args"])
