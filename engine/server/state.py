"""ServerState: what the routes share: the LLM, limits, the thread pool that tokenizes and renders
templates off the event loop, the requests in flight and the drain (shutdown) flags."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Callable

from ..tools.chat_template import ChatTemplate
from ..params import SamplingParams
from ..request_checks import encode_prompt
from . import DEFAULT_MAX_REQUEST_BYTES
from .generation import EngineError, EventPump, Submitted
from .logprobs import TokenStrings
from .metrics import ServerMetrics
from .protocol import BadRequest

log = logging.getLogger("moepipe.server")
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
# NFC normalisation (Qwen's tokenizer applies it) composes up to 3 characters into 1 (Hangul jamo)
NORMALIZE_SLACK = 4
# most logprob values (k + 1 per token) one request may ask for, over its prompts x n choices: each is
# a Python float and int on the host, several hundred bytes per token at k = 20
MAX_LOGPROB_VALUES = 2**22


@dataclass(frozen=True)
class ServerConfig:
    """The serve flags build_app takes (engine/cli/serve.py)."""
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


class ShuttingDown(EngineError):
    """The drain timeout expired: what is still running is cut off (503)."""


class ServerState:
    def __init__(self, llm, model_name: str, chat_template: ChatTemplate | None, generation_defaults: dict,
                 config: ServerConfig):
        self.llm, self.model_name, self.chat_template = llm, model_name, chat_template
        self.defaults, self.config = generation_defaults, config
        self.metrics = ServerMetrics(model_name, self._engine_stats)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moepipe-tokenize")
        self.draining = False  # /health 503, new requests 503
        self.expired = False  # the drain timeout passed: requests in flight are cut off
        self.inflight = 0  # /v1 requests whose response has not ended
        self.stream_queues: set[asyncio.Queue] = set()  # streams to tell when the drain expires
        self.pump: EventPump | None = None
        self.created = int(time.time())
        info = getattr(llm, "info", {}) or {}
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.config.vocab_size
        blocks, bs = info.get("num_blocks"), info.get("block_size")
        self.capacity = min(self.max_model_len, blocks * bs) if blocks and bs else self.max_model_len
        tok = llm.tokenizer
        # no token decodes to more characters than this: a longer text has more tokens than the context
        self.max_token_chars = tok.max_token_chars() if tok is not None and hasattr(tok, "max_token_chars") else None
        self.token_strings = TokenStrings(tok)  # logprobs' token texts and bytes

    def _engine_stats(self) -> dict | None:
        return self.llm.stats()

    async def in_thread(self, fn: Callable, *args):
        """fn(*args) on the pool: tokenization, template rendering and body parsing never block the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def engine_down(self) -> bool:
        return self.llm.dead_error is not None or self.llm.is_closed

    def expire_drain(self) -> None:
        """Tell every request still in flight that it is cut off (streams end with an error event)."""
        self.expired = True
        for q in list(self.stream_queues):
            q.put_nowait((-1, ShuttingDown("the server is shutting down: the drain timeout expired")))

    def check_text_length(self, chars: int, param: str) -> None:
        """A cheap bound before tokenizing: `chars` characters hold at least chars / max_token_chars tokens."""
        if self.max_token_chars and chars > self.capacity * self.max_token_chars * NORMALIZE_SLACK:
            raise BadRequest(f"the {param} has {chars} characters, so more tokens than the context limit of "
                             f"{self.capacity} tokens", param, "context_length_exceeded")

    def encode(self, prompt: str | list[int]) -> list[int]:
        try:
            return encode_prompt(prompt, self.llm.tokenizer, self.llm.config.vocab_size)
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None

    def params_for(self, req, prompt_len: int, index: int = 0, structured=None) -> SamplingParams:
        """SamplingParams with max_tokens checked against the context (400 naming the limit);
        structured: the request's structured_outputs (engine/server/structure.py)."""
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
        kw = {k: v for k, v in req.sampling_kwargs(self.defaults, self.vocab_size).items() if k in _SAMPLING_FIELDS}
        try:
            return SamplingParams(max_tokens=max_tokens, structured_outputs=structured, **kw)
        except ValueError as e:
            msg = str(e).removeprefix("SamplingParams: ")
            raise BadRequest(msg, msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in kw else None) from None

    def check_logprob_budget(self, params: list[SamplingParams], prompt_lens: list[int]) -> None:
        """400 when logprobs over every choice's max_tokens and prompt_logprobs over its prompt would
        hold more than MAX_LOGPROB_VALUES values (the API process would keep them all)."""
        total = 0
        for p, n in zip(params, prompt_lens):
            per = (p.max_tokens * (p.logprobs + 1) if p.logprobs is not None else 0) + \
                  (n * (p.prompt_logprobs + 1) if p.prompt_logprobs is not None else 0)
            total += p.n * per
        if total > MAX_LOGPROB_VALUES:
            param = "logprobs" if any(p.logprobs is not None for p in params) else "prompt_logprobs"
            raise BadRequest(f"{param}: n x (max_tokens x (logprobs + 1) + prompt tokens x (prompt_logprobs + 1)) "
                             f"over the prompts is {total} values, more than the {MAX_LOGPROB_VALUES} one request "
                             "may ask for: lower n, max_tokens or the number of logprobs", param)

    def submit(self, ids: list[int], params: SamplingParams, rid: str, arrival: float,
               cache_salt: str | None = None, reasoning: bool = False) -> Submitted:
        if self.pump is None:
            self.pump = EventPump(asyncio.get_running_loop())
        try:
            return Submitted(self.llm, ids, params, rid, self.metrics, arrival, self.pump, cache_salt, reasoning)
        except ValueError as e:
            raise BadRequest(str(e), None, "context_length_exceeded" if "exceeds" in str(e) else None) from None
        except RuntimeError as e:  # StageDied / EngineClosed: the detail (PIDs, tracebacks) goes to the log only
            log.error("request %s refused: the engine is down: %s", rid, e)
            raise EngineError("the engine is down") from None
