"""`python -m engine serve`: the OpenAI-compatible server (engine/server) on uvicorn. SIGTERM or
Ctrl-C stops taking requests, lets those in flight finish (up to --drain-timeout s), then ends
every stage."""
from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path

from ..options import add_option_flags, options_from_args
from .common import default_model


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


def run(a) -> int:
    try:
        import uvicorn

        from ..server.app import build_app
    except ImportError as e:
        raise RuntimeError(f"serve needs the serve extra ({e.name} is missing): pip install 'moepipe[serve]'") from None
    from ..chat_template import ChatTemplate
    from ..llm import LLM

    stages = a.stages if a.stages is not None else (1 if a.model else 2)
    opts = options_from_args(a, stages=stages)
    model = a.model or default_model()
    name = a.served_model_name or a.model or "moepipe-tiny"
    if a.chat_template and not Path(a.chat_template).is_file():
        raise ValueError(f"--chat-template {a.chat_template}: no such file")
    sock = _bind(a.host, a.port)
    with sock, LLM(model, options=opts) as llm:
        folder = llm.folder  # None for --load-format dummy of a preset name or a bare config
        template = ChatTemplate.from_folder(folder) if folder is not None else None
        if a.chat_template:
            special = template.special_tokens if template is not None else {}
            src = Path(a.chat_template)
            template = ChatTemplate({"default": src.read_text(encoding="utf-8")}, special, str(src))
        defaults = generation_defaults(folder) if folder is not None else {}
        app = build_app(llm, name, template, defaults)
        state = app.state.moepipe

        host, port = sock.getsockname()[:2]
        early: list[int] = []  # a SIGTERM between here and uvicorn taking the signals over

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                state.draining = True  # /health goes 503 and new requests are refused while in-flight ones finish
                super().handle_exit(sig, frame)

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if early:
                    self.handle_exit(early[0], None)
                else:  # uvicorn's signal handlers are in place: a SIGTERM from now on drains
                    print(f"serving {name} on http://{host}:{port} (max_model_len {llm.max_model_len})", flush=True)

        config = uvicorn.Config(app, log_level=a.log_level, timeout_graceful_shutdown=a.drain_timeout,
                                lifespan="off", timeout_keep_alive=5)
        server = Server(config)
        # uvicorn re-raises the signal it caught once drained; let that return here to close the stages
        previous = signal.signal(signal.SIGTERM, lambda sig, _: early.append(sig))
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
    print("server stopped; stages ended", file=sys.stderr, flush=True)
    return 0
