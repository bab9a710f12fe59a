"""The OpenAI-compatible HTTP app (FastAPI): /v1/completions, /v1/chat/completions (streamed as
server-sent events or not), /v1/models, /health, /metrics, /reset_prefix_cache. Every refusal is a 4xx with an
OpenAI-style JSON error; nothing a client sends can stop the engine or disturb other requests;
error bodies never carry exception text or PIDs (the log does)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..structured.requests import starts_in_reasoning
from ..tools.chat_template import ChatTemplate, ChatTemplateError
from .body import PayloadTooLarge, parse_json, read_body
from .chat_output import ChatDeltas, chat_message, finish_reason
from .gate import Gate
from .generation import EngineError, Submitted
from .metrics import CONTENT_TYPE
from .protocol import BadRequest, ChatCompletionRequest, CompletionRequest
from .responses import ChatChoices, CompletionChoices, usage
from .state import ServerConfig, ServerState, ShuttingDown
from .structure import check_grammar, structure_of

log = logging.getLogger("moepipe.server")
DISCONNECT_POLL_S = 0.25
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-plain", "literal",
               "constrained-str", "constrained-int", "constrained-float", "model-fields"}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """'temperature: Input should be less than or equal to 2' (union branch names left out of the path)."""
    err = e.errors(include_url=False, include_input=False)[0]
    loc = err["loc"]
    path = ".".join(str(x) for x in loc if isinstance(x, int) or (isinstance(x, str) and x.isidentifier()
                                                                   and x not in _TYPE_NAMES
                                                                   and not x.startswith(("list[", "dict["))))
    param = str(loc[0]) if loc else None
    if err["type"] == "missing":
        return f"{path}: a required field is missing", param
    msg = err["msg"].removeprefix("Value error, ")
    return (f"{path}: {msg}" if path else msg), param


def _validate(model_cls, raw: bytes):
    """Body bytes -> the request model (on the thread pool: a large body parses for a while)."""
    body = parse_json(raw)
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise BadRequest(msg, param) from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(llm, model_name: str, chat_template: ChatTemplate | None = None,
              generation_defaults: dict | None = None, config: ServerConfig | None = None) -> FastAPI:
    """The app over a started LLM (the caller owns and closes it)."""
    config = config or ServerConfig()
    app = FastAPI(title="moepipe", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(llm, model_name, chat_template, generation_defaults or {}, config)
    app.state.moepipe = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        state.metrics.rejected()
        return error_response(400, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(PayloadTooLarge)
    async def too_large(request: Request, exc: PayloadTooLarge):
        state.metrics.rejected()
        return error_response(413, str(exc), code="request_too_large")

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        return error_response(503, str(exc), "server_error")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error serving %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (see the server log)", "server_error")

    @app.get("/health")
    async def health():
        if state.draining:
            return error_response(503, "the server is shutting down", "server_error")
        if state.engine_down():
            return error_response(503, "the engine is down", "server_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state.created,
                                            "owned_by": "moepipe", "root": model_name,
                                            "max_model_len": state.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(await asyncio.to_thread(state.metrics.render), media_type=CONTENT_TYPE)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """As vLLM's: drop every cached block no running request holds (behind the API key);
        success is false when blocks of running requests stay cached."""
        if state.engine_down():
            raise EngineError("the engine is down")
        try:
            return {"success": bool(await asyncio.to_thread(state.llm.reset_prefix_cache))}
        except RuntimeError as e:  # the engine died meanwhile: the detail goes to the log only
            log.error("reset_prefix_cache: the engine is down: %s", e)
            raise EngineError("the engine is down") from None

    async def parse(request: Request, model_cls):
        if state.draining:
            raise EngineError("the server is shutting down")
        raw = await read_body(request, config.max_request_bytes)
        req = await state.in_thread(_validate, model_cls, raw)
        if req.model is not None and req.model != model_name:
            raise BadRequest(f"model {req.model!r} is not served here; this server serves {model_name!r}",
                             "model", "model_not_found")
        req.check_supported()
        return req

    def encode_all(prompts: list) -> list[list[int]]:
        for p in prompts:
            if isinstance(p, str):
                state.check_text_length(len(p), "prompt")
        return [state.encode(p) for p in prompts]

    def prompt_texts(prompts: list) -> list[str]:
        """The prompts as echo returns them: a text as sent, token ids decoded."""
        tok = state.llm.tokenizer
        return [p if isinstance(p, str) else tok.decode(p) if tok is not None else "" for p in prompts]

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        req: CompletionRequest = await parse(request, CompletionRequest)
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompts = req.prompts()
        ids = await state.in_thread(encode_all, prompts)
        st = structure_of(req)
        params = [state.params_for(req, len(x), i, st.grammar) for i, x in enumerate(ids)]
        state.check_logprob_budget(params, [len(x) for x in ids])
        if st.grammar is not None:  # compiled off the event loop; a bad schema is a 400 naming the field
            await state.in_thread(check_grammar, llm, params[0], st.param)
        texts = await state.in_thread(prompt_texts, prompts) if req.echo else []
        choices = CompletionChoices(state.token_strings, ids, texts, req.n, req.echo, req.logprobs,
                                    req.prompt_logprobs is not None)
        subs = _submit_all(state, ids, params, rid, arrival, req.cache_salt)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if req.stream:
            return _stream(state, request, subs, req, head, lambda i, p: [choices.choice(i, p)], None,
                           choices.prompt_tokens())
        results = await _collect_all(state, request, subs)
        if results is None:
            return Response(status_code=499)
        return {**head, "choices": [choices.choice(i, r) for i, r in enumerate(results)],
                "usage": usage(choices.prompt_tokens(), sum(r.num_tokens for r in results))}

    def render_and_encode(req: ChatCompletionRequest) -> tuple[list[int], bool]:
        """The prompt's ids, and whether it leaves the model thinking (reasoning is split off then)."""
        state.check_text_length(req.text_chars(), "messages")
        try:
            tools = req.template_tools()
            text = state.chat_template.render(req.template_messages(), req.add_generation_prompt, tools=tools,
                                              chat_template_kwargs=req.chat_template_kwargs)
            thinking = starts_in_reasoning(state.chat_template.pick(tools), text, req.chat_template_kwargs)
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages") from None
        except RecursionError:
            raise BadRequest("the conversation is nested too deeply for the chat template", "messages") from None
        state.check_text_length(len(text), "messages")
        return state.encode(text), thinking

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        if state.chat_template is None:
            raise BadRequest("this model has no chat template (chat_template.jinja or tokenizer_config.json's "
                             "chat_template); use /v1/completions", "messages")
        ids, thinking = await state.in_thread(render_and_encode, req)
        st = structure_of(req)
        params = state.params_for(req, len(ids), 0, st.grammar)
        state.check_logprob_budget([params], [len(ids)])
        if st.grammar is not None:
            await state.in_thread(check_grammar, llm, params, st.param)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        choices = ChatChoices(state.token_strings, [ids], req.n, req.prompt_logprobs is not None)
        subs = _submit_all(state, [ids], [params], rid, arrival, req.cache_salt, thinking)
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

        if req.stream:
            parsers = [ChatDeltas(thinking, st.parse_tools, st.single_call) for _ in subs]

            def choice(i: int, p) -> list[dict]:
                d, sampled = parsers[i], choices.sampling_fields(i, p)
                out = [{"index": i, "delta": x, "logprobs": None, "finish_reason": None}
                       for x in d.feed(p.text) + (d.finish() if p.finish_reason is not None else [])]
                if sampled["logprobs"] is not None:  # the piece's tokens, with its first delta (or an empty one)
                    if not out:
                        out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": None})
                    out[0]["logprobs"] = sampled["logprobs"]
                if p.finish_reason is not None:
                    out.append({"index": i, "delta": {}, "logprobs": None,
                                "finish_reason": finish_reason(p.finish_reason, d.called),
                                "stop_reason": sampled["stop_reason"]})
                return out
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)]
            return _stream(state, request, subs, req, head, choice, first, choices.prompt_tokens())
        results = await _collect_all(state, request, subs)
        if results is None:
            return Response(status_code=499)

        def one(i: int, r) -> dict:
            message, called = chat_message(r.text, thinking, st.parse_tools, st.single_call)
            return {"index": i, "message": message, **choices.sampling_fields(i, r),
                    "finish_reason": finish_reason(r.finish_reason, called)}
        return {**head, "object": "chat.completion", "choices": [one(i, r) for i, r in enumerate(results)],
                "usage": usage(choices.prompt_tokens(), sum(r.num_tokens for r in results)),
                **choices.prompt_logprobs(0, results[0])}

    app.add_middleware(_InFlight, state=state)
    app.add_middleware(Gate, api_key=config.api_key, allowed_origins=config.allowed_origins)
    if config.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    return app


class _InFlight:
    """Counts the /v1 requests whose response has not ended (the drain waits for them)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


def _submit_all(state: ServerState, ids: list[list[int]], params: list, rid: str, arrival: float,
                cache_salt: str | None, reasoning: bool = False) -> list[Submitted]:
    """Each prompt's n samples (SamplingParams.samples()) as requests of their own, in choice order."""
    jobs = [(x, sp) for x, p in zip(ids, params) for sp in p.samples()]
    subs: list[Submitted] = []
    try:
        for i, (x, sp) in enumerate(jobs):
            subs.append(state.submit(x, sp, rid if len(jobs) == 1 else f"{rid}-{i}", arrival, cache_salt,
                                     reasoning))
    except BaseException:
        for s in subs:
            s.abort()
        raise
    return subs


async def _collect_all(state: ServerState, request: Request, subs: list[Submitted]):
    """All results, or None (every request aborted) when the client goes away first; ShuttingDown
    (503) when the drain timeout expires first."""
    task = asyncio.ensure_future(asyncio.gather(*(s.collect() for s in subs)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if state.expired:
                raise ShuttingDown("the server is shutting down: the drain timeout expired")
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


def _stream(state: ServerState, request: Request, subs: list[Submitted], req, head: dict, choice,
            first_choices: list[dict] | None, prompt_tokens: int) -> StreamingResponse:
    """Server-sent events; an engine failure or the drain timeout ends the stream with an error
    event and [DONE]."""
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
            except Exception:  # a bug must end this stream with an error, not leave it hanging
                log.exception("internal error in stream %s", head["id"])
                await queue.put((i, EngineError("internal server error (see the server log)")))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(subs)]
        state.stream_queues.add(queue)
        try:
            for first in first_choices or ():
                yield _sse({**head, "choices": [first], **usage_field})
            open_ = len(subs) if not state.expired else 0
            if state.expired:
                yield _sse(error_body("the server is shutting down: the drain timeout expired", "server_error"))
            while open_:
                i, item = await queue.get()
                if item is None:
                    open_ -= 1
                    continue
                if isinstance(item, ShuttingDown):
                    yield _sse(error_body(str(item), "server_error"))
                    break
                if isinstance(item, EngineError):
                    yield _sse(error_body(str(item), "server_error"))
                    continue
                done_tokens[i] = item.num_tokens
                for c in choice(i, item):  # the piece's choice deltas (chat: reasoning, content, tool calls)
                    yield _sse({**head, "choices": [c], **usage_field})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage(prompt_tokens, sum(done_tokens))})
            yield "data: [DONE]\n\n"
        finally:
            state.stream_queues.discard(queue)
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
