"""The server's guards, with the official openai client where a client is involved: the API key
(401, /health open, MOEPIPE_API_KEY), CORS for --allowed-origins and 403 for a foreign origin's
simple POST, --max-request-bytes (413, also chunked), the drain timeout (streams end with an error
event and [DONE], other requests get a 503 body), and a dead stage ending the server non-zero
(or not, with --keep-alive-on-engine-death)."""
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from loader.presets import preset_config
from loader.writer import write_checkpoint
from server_util import MODEL_NAME, start_server
from slow_layers import inject_into_workers
from test_server import _stage_pids

pytestmark = pytest.mark.slow
KEY = "sk-test-123"
ALLOWED = "http://good.example"
LIMIT = 4096


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny_guard"), preset_config("tiny"), seed=7)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    # layer 1 spins 15 ms a forward, so the drain test's 250-token requests outlast its 2 s drain
    # however idle the machine is
    with pytest.MonkeyPatch.context() as mp:
        inject_into_workers(mp, tmp_path_factory.mktemp("slow"), "1:15")
        env = dict(os.environ, MOEPIPE_API_KEY=KEY)  # the key comes from the environment
    with start_server(tiny, tmp_path_factory.mktemp("log"), "--stages", "2", "--allowed-origins", ALLOWED,
                      "--max-request-bytes", str(LIMIT), "--drain-timeout", "2", env=env) as s:
        yield s.wait_ready()


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # open: load balancers probe it
    r = server.client(KEY).completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    # the prefix cache's reset is an admin action: behind the key too
    assert httpx.post(server.url + "/reset_prefix_cache").status_code == 401
    r = httpx.post(server.url + "/reset_prefix_cache", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"success": True}


def test_cors_and_foreign_origins(server):
    body = json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    auth = {"authorization": f"Bearer {KEY}"}
    # a web page's simple POST (text/plain, no preflight): refused from a foreign origin
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={**auth, "content-type": "text/plain", "origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    pre = httpx.options(server.url + "/v1/completions",
                        headers={"origin": ALLOWED, "access-control-request-method": "POST",
                                 "access-control-request-headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ALLOWED
    bad = httpx.options(server.url + "/v1/completions",
                        headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
    assert bad.headers.get("access-control-allow-origin") != "http://evil.example"
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={**auth, "content-type": "application/json", "origin": ALLOWED})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED


def test_request_size_limit(server):
    c = server.client(KEY)
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=MODEL_NAME, prompt="x" * (LIMIT + 1), max_tokens=2)
    assert e.value.status_code == 413 and "--max-request-bytes" in e.value.message

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b'{"model": "%s", "prompt": "' % MODEL_NAME.encode()
        for _ in range(LIMIT // 512 + 2):
            yield b"y" * 512
        yield b'"}'
    r = httpx.post(server.url + "/v1/completions", content=chunks(),
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "content-length" not in r.request.headers


def _in_engine(server, headers) -> float:
    """Requests running or waiting in the engine, from /metrics."""
    text = httpx.get(server.url + "/metrics", headers=headers, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(("moepipe:num_requests_running", "moepipe:num_requests_waiting")))


def test_drain_timeout_cuts_off_with_an_error_and_done(server):
    """Last in the module: it ends the server. A 2 s drain, requests that need far longer."""
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL_NAME, "prompt": "The long road", "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    lines, plain = [], {}

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=auth,
                          timeout=60) as r:
            for x in r.iter_lines():
                lines.append(x)

    def nonstream():
        plain["r"] = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60)

    threads = [threading.Thread(target=stream), threading.Thread(target=nonstream)]
    for t in threads:
        t.start()
    while not any(x.startswith("data: {") for x in lines):
        time.sleep(0.05)
    # the plain request too must be in the engine before the signal (its POST can trail the stream's
    # first token; sent after the signal it is refused as the server shuts down, not cut off)
    deadline = time.monotonic() + 20
    while _in_engine(server, auth) < 2:
        assert time.monotonic() < deadline, "the two requests never both reached the engine"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    t0, health = time.monotonic(), []
    while any(t.is_alive() for t in threads):  # /health: 503 for the whole drain, never refused
        try:
            health.append(httpx.get(server.url + "/health", timeout=5).status_code)
        except httpx.TransportError:  # the listener closes once the drain is over, maybe before a
            assert time.monotonic() - t0 >= 2.0, health  # client thread has noticed its response ended
            break
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert set(health[3:]) == {503} and len(health) >= 5, health
    assert time.monotonic() - t0 < 15
    data = [x[6:] for x in lines if x.startswith("data: ")]
    assert data[-1] == "[DONE]" and "drain timeout" in json.loads(data[-2])["error"]["message"]
    r = plain["r"]
    assert r.status_code == 503 and "drain timeout" in r.json()["error"]["message"]
    assert server.proc.wait(timeout=30) == 0


@pytest.mark.parametrize("keep_alive", [False, True])
def test_dead_stage_ends_the_server(tiny, tmp_path, keep_alive):
    flags = ["--keep-alive-on-engine-death"] if keep_alive else []
    with start_server(tiny, tmp_path, "--stages", "2", *flags) as s:
        s.wait_ready()
        stages = _stage_pids(s.proc.pid)
        os.kill(stages[1], signal.SIGKILL)
        t0 = time.monotonic()
        if keep_alive:
            time.sleep(3)
            assert s.proc.poll() is None
            r = httpx.get(s.url + "/health")
            assert r.status_code == 503 and "pid" not in r.text and str(stages[1]) not in r.text
            r = s.post("/v1/completions", {"model": MODEL_NAME, "prompt": "hi"})
            assert r.status_code == 503 and str(stages[1]) not in r.text
        else:
            assert s.proc.wait(timeout=15) != 0 and time.monotonic() - t0 < 10
            assert "error: the engine died" in s.log.read_text()
