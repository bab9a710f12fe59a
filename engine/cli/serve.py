"""`python -m engine serve`: the OpenAI-compatible server (engine/server) on uvicorn. SIGTERM or
Ctrl-C stops taking requests (/health 503) while those in flight finish, for up to --drain-timeout s;
then what is left is cut off (streams get an error event and [DONE], others a 503) and every stage
ends. If a stage dies the server exits non-zero within seconds (unless --keep-alive-on-engine-death)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from ..options import add_option_flags, options_from_args
from ..server import DEFAULT_MAX_REQUEST_BYTES
from .common import default_model

API_KEY_ENV = "MOEPIPE_API_KEY"
DEATH_POLL_S = 0.2
LAST_WORDS_S = 5.0  # after the drain timeout: how long cut-off responses get to send their last event


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", help="model folder or hub id ORG/NAME (default: the embedded tiny preset)")
    p.add_argument("--host", default="127.0.0.1", help="[default: 127.0.0.1]")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port [default: 8000]")
    p.add_argument("--served-model-name", help="the model name clients use [default: --model as given]")
    p.add_argument("--chat-template", help="a jinja file to use instead of the checkpoint's chat template")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM [default: 30]")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn log level [default: warning]")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (401 without it) [default: ${API_KEY_ENV}]")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated browser origins allowed by CORS, or '*'; requests from other origins "
                        "get 403 [default: none]")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body; larger ones get 413 [default: {DEFAULT_MAX_REQUEST_BYTES}]")
    p.add_argument("--keep-alive-on-engine-death", action="store_true",
                   help="keep answering (503) after a stage dies instead of exiting non-zero")
    add_option_flags(p, defaults={"stages": None})
    p.set_defaults(run=run)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def generation_defaults(folder: Path) -> dict:
    """temperature / top_p / top_k from generation_config.json: the defaults of unset request fields."""
    f = folder / "generation_config.json"
    if not f.exists():
        return {}
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k") if isinstance(cfg.get(k), (int, float))}


def _server_config(a):
    from ..server.state import ServerConfig
    if a.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {a.max_request_bytes}")
    if a.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {a.drain_timeout}")
    origins = tuple(o.strip().rstrip("/") for o in a.allowed_origins.split(",") if o.strip())
    return ServerConfig(api_key=a.api_key or None, allowed_origins=origins, max_request_bytes=a.max_request_bytes)


def _make_server(uvicorn, config, state, llm, a, banner: str):
    """A uvicorn.Server whose first SIGTERM drains (the listener stays open, /health answers 503)
    and a second one stops at once; it also stops, with exit_code 1, when a stage dies."""
    log = logging.getLogger("moepipe.server")

    class Server(uvicorn.Server):
        exit_code = 0
        early: list[int] = []  # a SIGTERM between loading and uvicorn taking the signals over

        def handle_exit(self, sig, frame):
            if state.draining:  # a second signal: stop now
                return super().handle_exit(sig, frame)
            state.draining = True
            self._captured_signals.append(sig)
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

        async def _drain(self):
            deadline = time.monotonic() + a.drain_timeout
            while state.inflight and time.monotonic() < deadline and not self.should_exit:
                await asyncio.sleep(0.05)
            if state.inflight:
                log.warning("drain timeout (%.0f s) expired with %d requests in flight: cutting them off",
                            a.drain_timeout, state.inflight)
                state.expire_drain()
                end = time.monotonic() + LAST_WORDS_S
                while state.inflight and time.monotonic() < end:
                    await asyncio.sleep(0.05)
            self.should_exit = True

        async def _watch_engine(self):
            while not self.should_exit:
                await asyncio.sleep(DEATH_POLL_S)
                dead = llm.dead_error
                if dead is not None:
                    log.error("the engine died: %s", dead)
                    print(f"error: the engine died: {str(dead).splitlines()[0]}", file=sys.stderr, flush=True)
                    self.exit_code = 1
                    self.should_exit = True
                    return

        async def startup(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if not a.keep_alive_on_engine_death:
                self._watcher = self._loop.create_task(self._watch_engine())
            if self.early:
                self.handle_exit(self.early[0], None)
            else:  # uvicorn's signal handlers are in place: a SIGTERM from now on drains
                print(banner, flush=True)

    return Server(config)


def run(a) -> int:
    try:
        import uvicorn

        from ..server.app import build_app
    except ImportError as e:
        raise RuntimeError(f"serve needs the serve extra ({e.name} is missing): pip install 'moepipe[serve]'") from None
    from ..tools.chat_template import ChatTemplate
    from ..llm import LLM

    stages = a.stages if a.stages is not None else (1 if a.model else 2)
    opts = options_from_args(a, stages=stages)
    model = a.model or default_model()
    name = a.served_model_name or a.model or "moepipe-tiny"
    if a.chat_template and not Path(a.chat_template).is_file():
        raise ValueError(f"--chat-template {a.chat_template}: no such file")
    server_config = _server_config(a)
    sock = _bind(a.host, a.port)
    with sock, LLM(model, options=opts) as llm:
        folder = llm.folder  # None for --load-format dummy of a preset name or a bare config
        template = ChatTemplate.from_folder(folder) if folder is not None else None
        if a.chat_template:
            special = template.special_tokens if template is not None else {}
            src = Path(a.chat_template)
            template = ChatTemplate({"default": src.read_text(encoding="utf-8")}, special, str(src))
        defaults = generation_defaults(folder) if folder is not None else {}
        app = build_app(llm, name, template, defaults, server_config)
        host, port = sock.getsockname()[:2]
        # the drain is ours (Server._drain); uvicorn's own wait only closes idle keep-alive connections
        config = uvicorn.Config(app, log_level=a.log_level, timeout_graceful_shutdown=LAST_WORDS_S,
                                lifespan="off", timeout_keep_alive=5)
        server = _make_server(uvicorn, config, app.state.moepipe, llm, a,
                              f"serving {name} on http://{host}:{port} (max_model_len {llm.max_model_len})")
        # uvicorn re-raises the signal it caught once drained; let that return here to close the stages
        previous = signal.signal(signal.SIGTERM, lambda sig, _: server.early.append(sig))
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            app.state.moepipe.pool.shutdown(wait=False, cancel_futures=True)
    print("server stopped; stages ended", file=sys.stderr, flush=True)
    return server.exit_code
