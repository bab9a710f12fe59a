"""Hostile and malformed requests against the server on the tiny preset (CPU, 2 stages): loose types,
out-of-range numbers, malformed tools and tool calls, lone surrogates, deep nesting each get a 400 in
the OpenAI error shape; a hypothesis property test throws random JSON at every field of both
endpoints while a greedy stream runs, which must come out byte-identical to the same request alone."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.presets import preset_config
from loader.writer import write_checkpoint
from server_util import MODEL_NAME, start_server

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "hi"}]
BIG = 2**63


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = write_checkpoint(tmp_path_factory.mktemp("tiny_hostile"), preset_config("tiny"), seed=7)
    with start_server(tiny, tmp_path_factory.mktemp("log"), "--stages", "2", "--max-model-len", "1024") as s:
        yield s.wait_ready()


def _deep(n: int, leaf="x"):
    for _ in range(n):
        leaf = {"a": leaf}
    return leaf


def _raw_deep(n: int) -> str:
    return '{"model": "%s", "prompt": "hi", "user": %s}' % (MODEL_NAME, "[" * n + "]" * n)


C = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
M = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2}
BAD_COMPLETIONS = [
    ({**C, "max_tokens": "3"}, "max_tokens"),
    ({**C, "max_tokens": True}, "max_tokens"),
    ({**C, "max_tokens": 2**31}, "max_tokens"),
    ({**C, "max_tokens": 2.0}, "max_tokens"),
    ({**C, "top_k": BIG, "temperature": 1}, "top_k"),
    ({**C, "top_k": 2**31}, "top_k"),
    ({**C, "seed": BIG}, "seed"),
    ({**C, "seed": -BIG - 1}, "seed"),
    ({**C, "temperature": "0.5"}, "temperature"),
    ({**C, "stream": "yes"}, "stream"),
    ({**C, "stop": ["a"] * 17}, "stop"),
    ({**C, "stop": 5}, "stop"),
    ({**C, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({**C, "logit_bias": {"5": 1000}}, "logit_bias"),
    ({**C, "stop_token_ids": [BIG]}, "stop_token_ids"),
    ({**C, "prompt": [1, True]}, "prompt"),
    ({**C, "prompt": [[]]}, "prompt"),
    ({**C, "prompt": "\ud800"}, "surrogate"),
    ({**C, "n": 10**6}, "n"),
    ({**C, "logprobs": 99}, "logprobs"),
    ({**C, "user": _deep(900)}, "nested too deeply"),
    (_raw_deep(1000), "nested too deeply"),
    (_raw_deep(100_000), "nested too deeply"),
    ('{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL_NAME, "temperature"),
    ('{"model": "%s", "prompt": "hi", "temperature": Infinity}' % MODEL_NAME, "temperature"),
    ({**C, "presence_penalty": 2.5}, "presence_penalty"),
    ({**C, "min_tokens": 3}, "min_tokens (3) must not exceed max_tokens (2)"),
    ({**C, "logit_bias": {"512": 1}}, "logit_bias: token id 512"),
    ({**C, "echo": 1}, "echo"),
    ({**C, "cache_salt": 5}, "cache_salt"),
    ({**C, "prompt": "ab " * 30_000}, "characters, so more tokens than the context limit"),  # not tokenized
]
BAD_CHAT = [
    ({**M, "top_logprobs": 3}, "top_logprobs: requires logprobs"),
    ({**M, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({**M, "logprobs": 1}, "logprobs"),
    ({**M, "tools": [{}]}, "tools.0.function"),
    ({**M, "tools": [{"function": 5}]}, "tools.0.function"),
    ({**M, "tools": [{"type": "function", "function": {"name": "f\ud800"}}]}, "surrogate"),
    ({**M, "tools": [{"type": "function", "function": {"name": "f", "parameters": _deep(900)}}]},
     "nested too deeply"),
    ({**M, "tool_choice": "sometimes"}, "tool_choice"),
    ({**M, "tool_choice": "required"}, "tool_choice: give tools"),
    ({**M, "messages": [{"role": "assistant", "content": "x", "tool_calls": "abc"}]}, "tool_calls"),
    ({**M, "messages": [{"role": "assistant", "content": "x", "tool_calls": [1, None]}]}, "tool_calls"),
    ({**M, "messages": [{"role": "user", "content": "\udfff"}]}, "surrogate"),
    ({**M, "messages": [{"role": "user", "content": "x", "extra": _deep(900)}]}, "nested too deeply"),
    ({**M, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({**M, "response_format": {"type": "json_schema"}}, "json_schema is required"),
    ({**M, "response_format": {"type": "yaml"}}, "response_format"),
    ({**M, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({**M, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({**M, "max_completion_tokens": "8"}, "max_completion_tokens"),
    ({**M, "messages": [{"role": "user", "content": [{"type": "text", "text": "ab " * 30_000}]}]}, "characters"),
]


def _check_400(r, needle: str, body) -> None:
    assert r.status_code == 400, (str(body)[:200], r.status_code, r.text[:300])
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error", (str(body)[:200], err)
    assert "Traceback" not in r.text and "pid" not in err["message"]


def test_hostile_requests_get_400_and_the_engine_stays_up(server):
    c = server.client()
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(c.completions.create, model=MODEL_NAME, prompt="The wheel turned", max_tokens=24,
                           temperature=0, extra_body={"ignore_eos": True})
        for path, cases in (("/v1/completions", BAD_COMPLETIONS), ("/v1/chat/completions", BAD_CHAT)):
            for body, needle in cases:
                _check_400(server.post(path, body), needle, body)
        assert long.result().usage.completion_tokens == 24


def test_typed_fields_parse(server):
    """Fields the engine does not serve yet still parse (a later step wires them); these are served."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    body = {**M, "tools": tools, "tool_choice": "auto", "parallel_tool_calls": True,
            "response_format": {"type": "text"}, "chat_template_kwargs": {"enable_thinking": False},
            "messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
            "top_k": -1, "seed": -5, "stop_token_ids": [1], "logprobs": False}
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    r = server.post("/v1/completions", {**C, "top_k": 2**31 - 1, "seed": 2**63 - 1, "temperature": 1})
    assert r.status_code == 200, r.text


# ---- the property test ---------------------------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=8)
_hostile = st.one_of(_json, st.sampled_from([True, False, -1, 0, 1, 2**31, 2**63, -2**63 - 1, 1e308, -0.0, "3", "",
                                             "\ud800", [], {}, [1, None], [{}], {"type": "function"}]))
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "user", "ignore_eos",
          "stop_token_ids", "min_tokens", "prompt_logprobs", "cache_salt", "logprobs", "model"]
COMPLETION_FIELDS = FIELDS + ["prompt", "echo", "best_of", "suffix"]
CHAT_FIELDS = FIELDS + ["messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls",
                        "top_logprobs", "response_format", "chat_template_kwargs", "add_generation_prompt"]
GREEDY = {"model": MODEL_NAME, "prompt": "Once upon a time the miller", "max_tokens": 48, "temperature": 0,
          "ignore_eos": True, "stream": True}


def _stream_text(url: str) -> str:
    with httpx.stream("POST", url + "/v1/completions", json=GREEDY, timeout=120) as r:
        events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


def test_random_json_never_500_and_a_greedy_stream_stays_identical(server):
    alone = _stream_text(server.url)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("text", _stream_text(server.url)))
    statuses = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(chat=st.booleans(), fields=st.data())
    def one(chat, fields):
        base = dict(M) if chat else dict(C)
        names = CHAT_FIELDS if chat else COMPLETION_FIELDS
        for name in fields.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            base[name] = fields.draw(_hostile)
        body = json.dumps(base)
        r = server.post("/v1/chat/completions" if chat else "/v1/completions", body, timeout=60)
        statuses.append(r.status_code)
        assert r.status_code in (200, 400), (body[:300], r.status_code, r.text[:300])
        assert "error" in r.json() if r.status_code == 400 else True

    t.start()
    one()
    t.join(timeout=120)
    assert box["text"] == alone and alone
    assert 400 in statuses and 200 in statuses
    assert httpx.get(server.url + "/health").status_code == 200


# ---- off the event loop (in process, over a stand-in engine) --------------------------------------
class _SlowEngine:
    """What build_app reads of an LLM, with a tokenizer that takes 1 s and notes its thread."""
    max_model_len, info, dead_error, is_closed = 256, {"num_blocks": 64, "block_size": 16}, None, False

    class config:
        vocab_size = 512

    def __init__(self):
        self.threads = []
        self.tokenizer = self

    def encode(self, prompt):  # the tokenizer's
        self.threads.append(threading.get_ident())
        time.sleep(1.0)
        raise ValueError("stand-in engine: the tokenizer refuses")

    def stats(self):
        return {}


class _SlowTemplate:
    def __init__(self, engine):
        self.engine = engine

    def render(self, messages, add_generation_prompt=True, tools=None, chat_template_kwargs=None):
        self.engine.threads.append(threading.get_ident())
        return "rendered"

    def pick(self, tools=None):
        return "a template without a thinking switch"


def test_tokenization_and_templates_run_off_the_event_loop():
    import asyncio
    from engine.server.app import build_app
    eng = _SlowEngine()
    app = build_app(eng, MODEL_NAME, _SlowTemplate(eng))

    async def go():
        loop_thread = threading.get_ident()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            slow = [asyncio.ensure_future(http.post("/v1/completions", json=C)),
                    asyncio.ensure_future(http.post("/v1/chat/completions", json=M))]
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            assert (await http.get("/health")).status_code == 200
            health_s = time.monotonic() - t0
            codes = [(await r).status_code for r in slow]
        return loop_thread, health_s, codes

    loop_thread, health_s, codes = asyncio.run(go())
    assert codes == [400, 400] and len(eng.threads) == 3  # two encodes and one render
    assert loop_thread not in eng.threads and health_s < 0.5
