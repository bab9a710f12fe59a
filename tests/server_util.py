"""A `python -m engine serve` subprocess for the server tests: started on a free port of 127.0.0.1,
driven by the official openai client or httpx, ended by SIGTERM (killed if it hangs)."""
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx  # imported here: a first import racing the openai client's in another thread fails

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-test"
STARTUP_S = 180


class Server:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log, self.url, self._client = proc, log, None, None

    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + STARTUP_S
        while self.url is None:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            m = re.search(r"serving \S+ on (http://[\d.]+:\d+)", text)
            if m:
                self.url = m.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit code {self.proc.poll()}):\n{text[-3000:]}")
            else:
                time.sleep(0.1)
        return self

    def client(self, api_key: str = "unused"):
        import openai
        if self._client is None or self._client.api_key != api_key:
            self._client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        return self._client

    def post(self, path: str, body, timeout: float = 60, headers: dict | None = None):
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers={"content-type": "application/json", **(headers or {})},
                          timeout=timeout)

    def metrics(self) -> dict[str, float]:
        out = {}
        text = httpx.get(self.url + "/metrics", timeout=30).text
        text = re.sub(r',?model_name="[^"]*"', "", text).replace("{,", "{").replace("{}", "")
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@contextlib.contextmanager
def start_server(model: Path, log_dir: Path, *flags: str, env: dict | None = None):
    """The server on `model` (not yet ready: call wait_ready()); ended on exit."""
    log = log_dir / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--model", str(model), "--host", "127.0.0.1",
                                 "--port", "0", "--served-model-name", MODEL_NAME, "--quiet", "--max-model-len", "256",
                                 "--log-level", "warning", *flags], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    try:
        yield Server(proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
