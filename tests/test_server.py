"""The OpenAI-compatible server on the tiny preset (CPU, 2 stages, 127.0.0.1, a free port), driven
by the official `openai` client and raw HTTP: completions and chat, streamed and not; greedy text
equal to LLM.generate of the same rendered prompt; 32 concurrent clients served together; a client
that leaves mid-stream frees its KV blocks; bad requests get 400s; SIGTERM drains. One server
process for the module; the SIGTERM test, last, ends it."""
import json
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.server.detokenize import IncrementalDetokenizer, StopHoldback
from server_util import MODEL_NAME, Server, start_server
from loader.presets import preset_config
from loader.writer import write_checkpoint



# ---- pieces without a server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny_serve"), preset_config("tiny"), seed=7)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from loader.model_files import load_tokenizer
    return load_tokenizer(tiny)


def test_incremental_detokenizer_never_emits_partial_utf8(tokenizer):
    text = "Hello, 日本語 wörld! 🙂 The river ran <think>quietly</think> past 42 mills."
    ids = tokenizer.encode(text)
    rng = random.Random(0)
    ids = ids + [rng.randrange(3, 500) for _ in range(200)]  # random ids decode to broken byte runs too
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    clean = IncrementalDetokenizer(tokenizer)
    got = [clean.add(t) for t in tokenizer.encode(text)]
    assert "".join(got) == text and not any("\ufffd" in d for d in got)
    assert sum(1 for d in got if d) < len(got)  # multi-byte characters were held back until complete


def test_cli_stream_print_never_prints_half_a_character(tokenizer, capsys):
    from engine.cli.common import stream_print
    text = "日本語 🙂 wörld"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(1, len(ids)))  # split across tokens
    assert stream_print(((0, t, None) for t in ids), tokenizer) == ids
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("stops,want,hit", [
    (["wor"], "hello ", True),
    (["xyz"], "hello world, hello moon", False),
    (["lo m", "ld,"], "hello wor", True),
    (["o"], "hell", True),
])
def test_stop_holdback_never_sends_past_the_engines_cut(stops, want, hit):
    """The engine ends the text at the first stop string (the final text, cut before it); what the
    stream sent before that must be a prefix of that final text, whatever the chunking."""
    text = "hello world, hello moon"
    for sizes in ([1], [2, 3], [len(text)]):
        h, out, i, k = StopHoldback(stops), [], 0, 0
        while i < len(text):
            n = sizes[k % len(sizes)]
            i, k = i + n, k + 1
            if any(s in text[:i] for s in stops):
                break  # this token completes a stop string: its event carries the engine's final text
            out.append(h.push(text[i - n:i]))
            assert want.startswith("".join(out)), (sizes, out)
        out.append(h.finish(want if hit else None))
        assert "".join(out) == want
        assert h.push("") == "" and h.finish() == ""  # nothing twice


def test_stage_busy_fraction_and_prometheus_text():
    from prometheus_client.parser import text_string_to_metric_families
    from engine.server.metrics import ServerMetrics
    stats = {"scheduler": {"running": 3, "waiting": 1, "preemptions": 2, "prompt_tokens": 40, "generation_tokens": 9,
                           "num_blocks": 10, "free_blocks": 4},
             "stages": [{"rank": 0, "busy_ms": 100.0, "steps": 5, "tokens": 50},
                        {"rank": 1, "busy_ms": 40.0, "steps": 5, "tokens": 50}]}
    m, t0 = ServerMetrics("m", lambda: stats), time.monotonic()
    m.busy_fractions(stats["stages"], now=t0 + 1)
    f = m.busy_fractions([{"rank": 0, "busy_ms": 600.0}, {"rank": 1, "busy_ms": 290.0}], now=t0 + 2)
    assert f == pytest.approx({0: 0.5, 1: 0.25})
    for v in (0.05, 0.1, 0.5, 3.0):
        m.first_token(v)
    m.request_done("length", 2.0, 5, 0.4)
    m.request_done("length", 1.0, 1, 0.0)
    m.rejected()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}

    def val(name, **labels):
        return got[(name, tuple(sorted({"model_name": "m", **labels}.items())))]
    assert val("moepipe:time_to_first_token_seconds_bucket", le="0.1") == 2  # 0.05 and 0.1 (le is inclusive)
    assert val("moepipe:time_to_first_token_seconds_bucket", le="0.5") == 3
    assert val("moepipe:time_to_first_token_seconds_count") == 4
    assert val("moepipe:time_to_first_token_seconds_sum") == pytest.approx(3.65)
    assert val("moepipe:time_per_output_token_seconds_sum") == pytest.approx(0.1)  # 0.4 s over 4 later tokens
    assert val("moepipe:request_success_total", finished_reason="length") == 2
    assert val("moepipe:request_rejected_total") == 1
    assert val("moepipe:num_requests_running") == 3 and val("moepipe:num_requests_waiting") == 1
    assert val("moepipe:num_preemptions_total") == 2 and val("moepipe:prompt_tokens_total") == 40
    assert val("moepipe:generation_tokens_total") == 9 and val("moepipe:kv_blocks_used") == 6
    assert val("moepipe:kv_cache_usage_perc") == pytest.approx(0.6) and val("moepipe:kv_blocks_free") == 4
    assert val("moepipe:stage_busy_seconds_total", stage="1") == pytest.approx(0.04)
    assert val("moepipe:stage_steps_total", stage="0") == 5 and val("moepipe:model_info") == 1
    assert not any(name.endswith("_created") for name, _ in got)
    assert not any(name == "moepipe:step_cost_scale" for name, _ in got)  # no bound, no calibration
    stats["scheduler"]["step_cost_scale"] = 0.43
    assert "moepipe:step_cost_scale{model_name=\"m\"} 0.43" in m.render().decode()


# ---- one server for the module -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_proc(tiny, tmp_path_factory):
    with start_server(tiny, tmp_path_factory.mktemp("serve_log"), "--stages", "2", "--drain-timeout", "60") as s:
        yield s


@pytest.fixture(scope="module")
def ref_llm(tiny, server_proc):
    """The reference engine (1 stage: greedy tokens equal across stage counts), loaded while the
    server process loads its own."""
    from engine import LLM
    with LLM(str(tiny), stages=1, verbose=False, max_model_len=256) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(server_proc) -> Server:
    return server_proc.wait_ready()


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The river ran past the mill?"}]


def test_openai_client_completions_equal_llm_generate(server, ref_llm):
    from engine import SamplingParams
    prompt = "The miller's daughter watched the water"
    want = ref_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    c = server.client()
    r = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 8)
    chunks = list(c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(ch.usage is None for ch in chunks[:-1])
    # token-id prompts and max_tokens as the only limit; seeded sampling repeats
    ids = want.prompt_token_ids
    r2 = c.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    assert r2.choices[0].text == want.text
    kw = dict(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 50, "ignore_eos": True})
    assert c.completions.create(seed=3, **kw).choices[0].text == c.completions.create(seed=3, **kw).choices[0].text


def test_openai_client_chat_equals_llm_generate_of_rendered_prompt(server, ref_llm, tiny):
    from engine import SamplingParams
    from engine.tools.chat_template import render_chat
    c = server.client()
    for kwargs in ({}, {"enable_thinking": False}):
        rendered = render_chat(tiny, CHAT, chat_template_kwargs=kwargs)
        want = ref_llm.generate([rendered], SamplingParams(max_tokens=8, temperature=0))[0]
        via_chat = ref_llm.chat(CHAT, SamplingParams(max_tokens=8, temperature=0), chat_template_kwargs=kwargs)[0]
        assert via_chat.prompt_token_ids == want.prompt_token_ids and via_chat.token_ids == want.token_ids
        extra = {"chat_template_kwargs": kwargs} if kwargs else {}
        r = c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=8, temperature=0,
                                      extra_body=extra)
        m = r.choices[0]
        # thinking on: the output never closes its `<think>`, so all of it is reasoning_content;
        # thinking off: nothing is split
        field = "content" if kwargs else "reasoning_content"
        other = "reasoning_content" if kwargs else "content"
        assert m.message.role == "assistant" and getattr(m.message, field) == want.text
        assert getattr(m.message, other, None) is None
        assert m.finish_reason == want.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
        chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0,
                                                stream=True, extra_body=extra))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(getattr(ch.choices[0].delta, field, None) or "" for ch in chunks) == want.text
        assert not any(getattr(ch.choices[0].delta, other, None) for ch in chunks)
        assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_stop_strings_cut_out_streamed_and_not(server):
    c = server.client()
    kw = dict(model=MODEL_NAME, prompt="Hello, world! How are", max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True})
    free = c.completions.create(**kw).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    want = free[:free.index(stop)]
    r = c.completions.create(stop=[stop, "never-there"], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    got = "".join(ch.choices[0].text for ch in c.completions.create(stop=stop, stream=True, **kw))
    assert got == want


def test_32_concurrent_clients_are_batched(server):
    import httpx
    before = server.metrics()

    def one(http: httpx.Client, i: int):
        body = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        if i % 2:
            r = http.post("/v1/completions", json={**body, "prompt": f"Request {i}: the river"}).json()
            return r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"], r["choices"][0]["text"]
        body = {**body, "messages": [{"role": "user", "content": f"Hi {i}"}], "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(x) for x in events[:-1]]
        return (chunks[-2]["choices"][0]["finish_reason"], chunks[-1]["usage"]["completion_tokens"],
                "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]))

    with httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=64)) as http, \
            ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: one(http, i), range(32)))
    assert all(r[:2] == ("length", 8) for r in results), results
    after = server.metrics()
    steps = after['moepipe:stage_steps_total{stage="1"}'] - before['moepipe:stage_steps_total{stage="1"}']
    generated = after["moepipe:generation_tokens_total"] - before["moepipe:generation_tokens_total"]
    assert generated >= 32 * 8
    # Each request's tokens after its first come from decode steps: 32 * 7 of them. Served one at a
    # time that is 224 steps of one sequence; fewer than half as many steps in all (prefill steps
    # included) means the decode steps carried more than 2 sequences on average.
    assert steps < 32 * 7 / 2, (steps, generated)


def _wait_idle(server, num_blocks: float, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["moepipe:num_requests_running"] == 0 and m["moepipe:kv_blocks_free"] == num_blocks:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV pool not free again: {m}")
        time.sleep(0.1)


def test_client_disconnect_aborts_and_frees_blocks(server):
    import httpx
    before = server.metrics()
    total = before["moepipe:kv_blocks_total"]
    assert before["moepipe:kv_blocks_free"] == total
    body = {"model": MODEL_NAME, "prompt": "The traveller told them about distant cities", "max_tokens": 240,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
        mid = server.metrics()
        assert mid["moepipe:num_requests_running"] == 1 and mid["moepipe:kv_blocks_free"] < total
    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    after = _wait_idle(server, total)
    aborted = 'moepipe:request_success_total{finished_reason="abort"}'
    assert after.get(aborted, 0) - before.get(aborted, 0) == 2, after  # both ended by the server's abort, not by max_tokens


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"model": MODEL_NAME}, "prompt: a required field is missing"),
    ({"model": "gpt-4", "prompt": "hi"}, "model 'gpt-4' is not served"),
    ({"model": MODEL_NAME, "prompt": "hi", "temperature": 5}, "temperature"),
    ({"model": MODEL_NAME, "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "top_k": -5}, "top_k"),
    ({"model": MODEL_NAME, "prompt": "hi", "n": 0}, "n: Input should be greater than or equal to 1"),
    ({"model": MODEL_NAME, "prompt": "hi", "stop": [""]}, "stop"),
    ({"model": MODEL_NAME, "prompt": [99999]}, "token ids must be integers in [0, 512)"),
    ({"model": MODEL_NAME, "prompt": ""}, "prompt: String should have at least 1 character"),
    ({"model": MODEL_NAME, "prompt": list(range(3, 303))}, "300 tokens: the context limit (max_model_len) is 256"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1000}, "exceeds the context limit (max_model_len) of 256"),
]
BAD_CHAT = [
    ({"model": MODEL_NAME, "messages": []}, "messages"),
    ({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 2000}]}, "context limit (max_model_len)"),
    ({"model": MODEL_NAME, "messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
]


def test_bad_requests_get_400_and_disturb_nothing(server):
    import openai
    c = server.client()
    # a long request runs through all the bad ones and must finish untouched
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(c.completions.create, model=MODEL_NAME, prompt="The wheel turned", max_tokens=24,
                           temperature=0, extra_body={"ignore_eos": True})
        for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
            for body, needle in cases:
                r = server.post(path, body)
                assert r.status_code == 400, (body, r.text)
                err = r.json()["error"]
                assert needle in err["message"] and err["type"] == "invalid_request_error", (body, err)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL_NAME, prompt="hi", temperature=-1)
        assert "temperature" in e.value.message
        with pytest.raises(openai.BadRequestError, match="max_model_len"):
            c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "y" * 3000}])
        assert long.result().usage.completion_tokens == 24
    r = server.post("/v1/nope", {})
    assert r.status_code == 404 and "error" in r.json()
    import httpx
    assert httpx.get(server.url + "/health").status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_metrics_text(server):
    import httpx
    r = server.client().completions.create(model=MODEL_NAME, prompt="a", max_tokens=2, temperature=0,
                                           extra_body={"ignore_eos": True})  # so the histograms hold a request
    assert r.usage.completion_tokens == 2
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_used", "kv_blocks_free",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "time_per_output_token_seconds_count", "stage_busy_fraction"):
        assert f"moepipe:{name}" in text, name
    m = server.metrics()
    assert m["moepipe:time_to_first_token_seconds_count"] > 0 and m['moepipe:stage_busy_fraction{stage="0"}'] >= 0
    assert m['moepipe:time_to_first_token_seconds_bucket{le="+Inf"}'] == m["moepipe:time_to_first_token_seconds_count"]


def _stage_pids(pid: int) -> list[int]:
    """The engine.runtime.worker children of a process."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        f = task / "children"
        if f.exists():
            out += [int(x) for x in f.read_text().split()]
    return [p for p in out if b"engine.runtime.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_sigterm_drains_in_flight_then_ends_every_stage(server):
    """Last in the module: it ends the server."""
    import httpx
    stages = _stage_pids(server.proc.pid)
    assert len(stages) == 2
    c = server.client()
    stream = c.completions.create(model=MODEL_NAME, prompt="Every morning she carried bread", max_tokens=32,
                                  temperature=0, stream=True, stream_options={"include_usage": True},
                                  extra_body={"ignore_eos": True})
    first = next(iter(stream))
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while True:  # /health says 503 while draining, then the port stops taking connections
        try:
            assert httpx.get(server.url + "/health", timeout=5).status_code in (200, 503)  # 200: not yet seen
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "still taking connections after SIGTERM"
        time.sleep(0.1)
    rest = list(stream)
    assert rest[-1].usage.completion_tokens == 32  # the in-flight request finished in full
    assert [ch.choices[0].finish_reason for ch in [first, *rest] if ch.choices][-1] == "length"
    assert server.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in stages) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in stages)
