"""OpenAI request bodies (pydantic) for /v1/completions and /v1/chat/completions, the vLLM-style
extras (top_k, min_p, ignore_eos, chat_template_kwargs, ...), and what the engine needs from them."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 16


class BadRequest(ValueError):
    """A request the server refuses with 400; `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras, as vLLM takes them
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def check_supported(self) -> None:
        if self.n != 1:
            raise BadRequest(f"n={self.n}: only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported (give 0)", name)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed with stream=true", "stream_options")

    def requested_max_tokens(self) -> int | None:
        """The request's token limit (each request type declares max_tokens with its own default)."""
        return self.max_tokens

    def sampling_kwargs(self, defaults: dict) -> dict:
        """SamplingParams keywords but max_tokens; unset values fall back to the model's defaults
        (generation_config.json), then to OpenAI's (temperature 1, top_p 1)."""
        kw = {"temperature": self.temperature if self.temperature is not None else defaults.get("temperature", 1.0),
              "top_p": self.top_p if self.top_p is not None else defaults.get("top_p", 1.0),
              "top_k": self.top_k if self.top_k is not None else defaults.get("top_k", 0),
              "seed": self.seed, "ignore_eos": self.ignore_eos}
        if kw["top_k"] == -1:  # vLLM's "off"
            kw["top_k"] = 0
        if self.min_p is not None:
            kw["min_p"] = self.min_p
        if self.stop_token_ids is not None:
            if any(t < 0 for t in self.stop_token_ids):
                raise BadRequest("stop_token_ids must be non-negative", "stop_token_ids")
            kw["stop_token_ids"] = tuple(self.stop_token_ids)
        return kw


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise BadRequest("echo is not supported", "echo")
        if self.logprobs is not None:
            raise BadRequest("logprobs is not supported", "logprobs")
        if self.best_of not in (None, 1):
            raise BadRequest("best_of is not supported", "best_of")
        if self.suffix:
            raise BadRequest("suffix is not supported", "suffix")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [p]
        else:
            out = list(p)
        if not out:
            raise BadRequest("prompt is empty", "prompt")
        for i, x in enumerate(out):
            if len(x) == 0:
                raise BadRequest(f"prompt {i} is empty", "prompt")
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def plain(self) -> dict:
        """The message as the template reads it: text parts joined by newlines (as vLLM does)."""
        m = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"content part of type {part.get('type')!r}: only text parts are supported",
                                     "messages")
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        if m["role"] == "developer":
            m["role"] = "system"
        return m


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    # extras
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise BadRequest("logprobs is not supported", "logprobs")
        if self.tool_choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice: only 'none' and 'auto' are supported", "tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            raise BadRequest("response_format: only {'type': 'text'} is supported", "response_format")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        return [m.plain() for m in self.messages]
