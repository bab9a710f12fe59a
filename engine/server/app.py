"""The OpenAI-compatible HTTP app (FastAPI): /v1/completions, /v1/chat/completions (streamed as
server-sent events or not), /v1/models, /health, /metrics. Every refusal is a 4xx with an
OpenAI-style JSON error; nothing a client sends can stop the engine or disturb other requests."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import fields
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat_template import ChatTemplate, ChatTemplateError
from ..params import SamplingParams
from .generation import EngineError, EventPump, Submitted
from .metrics import ServerMetrics
from .protocol import BadRequest, ChatCompletionRequest, CompletionRequest

DISCONNECT_POLL_S = 0.25
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal"}
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """'temperature: Input should be less than or equal to 2' (union branch names left out of the path)."""
    err = e.errors()[0]
    loc = err["loc"]
    path = ".".join(str(x) for x in loc if isinstance(x, int) or (isinstance(x, str) and x.isidentifier()
                                                                   and x not in _TYPE_NAMES))
    param = str(loc[0]) if loc else None
    if err["type"] == "missing":
        return f"{path}: a required field is missing", param
    return (f"{path}: {err['msg']}" if path else err["msg"]), param


class ServerState:
    def __init__(self, llm, model_name: str, chat_template: ChatTemplate | None, generation_defaults: dict):
        self.llm, self.model_name, self.chat_template = llm, model_name, chat_template
        self.defaults = generation_defaults
        self.metrics = ServerMetrics()
        self.draining = False
        self.pump: EventPump | None = None
        self.created = int(time.time())
        info = getattr(llm, "info", {}) or {}
        self.max_model_len = llm.max_model_len
        blocks, bs = info.get("num_blocks"), info.get("block_size")
        self.capacity = min(self.max_model_len, blocks * bs) if blocks and bs else self.max_model_len

    def encode(self, prompt: str | list[int]) -> list[int]:
        try:
            return self.llm._encode(prompt)
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None

    def params_for(self, req, prompt_len: int, index: int = 0) -> SamplingParams:
        """SamplingParams with max_tokens checked against the context (400 naming the limit)."""
        limit_name = "max_model_len" if self.capacity == self.max_model_len else "KV cache"
        where = f"prompt {index} " if index else "prompt "
        if prompt_len >= self.capacity:
            raise BadRequest(f"{where}has {prompt_len} tokens: the context limit ({limit_name}) is {self.capacity} "
                             f"tokens, so no room is left to generate", "messages" if hasattr(req, "messages")
                             else "prompt", "context_length_exceeded")
        asked = req.requested_max_tokens()
        max_tokens = asked if asked is not None else self.capacity - prompt_len
        if prompt_len + max_tokens > self.capacity:
            raise BadRequest(f"{where}of {prompt_len} tokens + max_tokens {max_tokens} = {prompt_len + max_tokens} "
                             f"exceeds the context limit ({limit_name}) of {self.capacity} tokens",
                             "max_tokens", "context_length_exceeded")
        kw = {k: v for k, v in req.sampling_kwargs(self.defaults).items() if k in _SAMPLING_FIELDS}
        try:
            return SamplingParams(max_tokens=max_tokens, **kw)
        except ValueError as e:
            raise BadRequest(str(e).removeprefix("SamplingParams: ")) from None

    def submit(self, ids: list[int], params: SamplingParams, stops: list[str], rid: str, arrival: float) -> Submitted:
        if self.pump is None:
            self.pump = EventPump(asyncio.get_running_loop())
        try:
            return Submitted(self.llm, ids, params, stops, rid, self.metrics, arrival, self.pump)
        except ValueError as e:
            raise BadRequest(str(e), None, "context_length_exceeded" if "exceeds" in str(e) else None) from None
        except RuntimeError as e:  # StageDied / EngineClosed
            raise EngineError(str(e).splitlines()[0]) from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_app(llm, model_name: str, chat_template: ChatTemplate | None = None,
              generation_defaults: dict | None = None) -> FastAPI:
    """The app over a started LLM (the caller owns and closes it)."""
    app = FastAPI(title="moepipe", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(llm, model_name, chat_template, generation_defaults or {})
    app.state.moepipe = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        state.metrics.rejected += 1
        return error_response(400, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        return error_response(503, str(exc), "server_error")

    @app.get("/health")
    async def health():
        if state.draining:
            return error_response(503, "the server is shutting down", "server_error")
        dead = getattr(llm, "_dead", None)
        if dead is not None or getattr(llm, "_closed", False):
            return error_response(503, f"the engine is down: {str(dead).splitlines()[0] if dead else 'closed'}",
                                  "server_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state.created,
                                            "owned_by": "moepipe", "root": model_name,
                                            "max_model_len": state.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        try:
            stats = await asyncio.to_thread(llm.stats)
        except RuntimeError:
            stats = None
        return PlainTextResponse(state.metrics.render(stats, model_name), media_type="text/plain; version=0.0.4")

    async def parse(request: Request, model_cls):
        if state.draining:
            raise EngineError("the server is shutting down")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise BadRequest(msg, param) from None
        if req.model is not None and req.model != model_name:
            raise BadRequest(f"model {req.model!r} is not served here; this server serves {model_name!r}",
                             "model", "model_not_found")
        req.check_supported()
        return req

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        req: CompletionRequest = await parse(request, CompletionRequest)
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompts = req.prompts()
        ids = [state.encode(p) for p in prompts]
        params = [state.params_for(req, len(x), i) for i, x in enumerate(ids)]
        subs = _submit_all(state, ids, params, req.stop, rid, arrival)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}

        def choice(i: int, text: str, reason: str | None) -> dict:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

        if req.stream:
            return _stream(request, subs, req, head, lambda i, p: choice(i, p.text, p.finish_reason), None)
        results = await _collect_all(request, subs)
        if results is None:
            return Response(status_code=499)
        return {**head, "choices": [choice(i, r.text, r.finish_reason) for i, r in enumerate(results)],
                "usage": _usage(sum(r.prompt_tokens for r in results), sum(r.num_tokens for r in results))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        if state.chat_template is None:
            raise BadRequest("this model has no chat template (chat_template.jinja or tokenizer_config.json's "
                             "chat_template); use /v1/completions", "messages")
        try:
            text = state.chat_template.render(req.template_messages(), req.add_generation_prompt,
                                              tools=req.tools if req.tool_choice != "none" else None,
                                              chat_template_kwargs=req.chat_template_kwargs)
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages") from None
        ids = state.encode(text)
        params = state.params_for(req, len(ids))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        subs = _submit_all(state, [ids], [params], req.stop, rid, arrival)
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

        if req.stream:
            def choice(i: int, p) -> dict:
                delta = {"content": p.text} if p.text or p.finish_reason is None else {}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": p.finish_reason}
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            return _stream(request, subs, req, head, choice, first)
        results = await _collect_all(request, subs)
        if results is None:
            return Response(status_code=499)
        r = results[0]
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": _usage(r.prompt_tokens, r.num_tokens)}

    return app


def _submit_all(state: ServerState, ids, params, stops, rid: str, arrival: float) -> list[Submitted]:
    subs: list[Submitted] = []
    try:
        for i, (x, sp) in enumerate(zip(ids, params)):
            subs.append(state.submit(x, sp, stops, rid if len(ids) == 1 else f"{rid}-{i}", arrival))
    except BaseException:
        for s in subs:
            s.abort()
        raise
    return subs


async def _collect_all(request: Request, subs: list[Submitted]):
    """All results, or None (every request aborted) when the client goes away first."""
    task = asyncio.ensure_future(asyncio.gather(*(s.collect() for s in subs)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                try:
                    return task.result()
                except EngineError:
                    raise
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for s in subs:
            s.abort()


def _stream(request: Request, subs: list[Submitted], req, head: dict, choice, first_choice) -> StreamingResponse:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    usage_field = {"usage": None} if include_usage else {}

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()
        done_tokens = [0] * len(subs)

        async def pump(i: int, s: Submitted):
            try:
                async for p in s.pieces():
                    await queue.put((i, p))
            except EngineError as e:
                await queue.put((i, e))
            except Exception as e:  # a bug must end this stream with an error, not leave it hanging
                await queue.put((i, EngineError(f"internal error: {type(e).__name__}: {e}")))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(subs)]
        try:
            if first_choice is not None:
                yield _sse({**head, "choices": [first_choice], **usage_field})
            open_ = len(subs)
            while open_:
                i, item = await queue.get()
                if item is None:
                    open_ -= 1
                    continue
                if isinstance(item, EngineError):
                    yield _sse(error_body(str(item), "server_error"))
                    continue
                done_tokens[i] = item.num_tokens
                yield _sse({**head, "choices": [choice(i, item)], **usage_field})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(sum(s.prompt_tokens for s in subs),
                                                                  sum(done_tokens))})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in subs:
                s.abort()

    return _AbortingStream(subs, events(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _AbortingStream(StreamingResponse):
    """Aborts its requests however the response ends, even if the body was never started (the
    client left before the headers went out)."""

    def __init__(self, subs: list[Submitted], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._subs = subs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self._subs:
                s.abort()
