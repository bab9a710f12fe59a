"""OpenAI request bodies (pydantic) for /v1/completions and /v1/chat/completions and the vLLM-style
extras (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, prompt_logprobs, cache_salt,
chat_template_kwargs, ...): every field strictly typed as the OpenAI API types it (no "3" or true for
an integer), every number bounded and finite, every list and map bounded in length. What the engine
cannot serve yet is refused in one place, `check_supported`; `sampling_kwargs` maps the rest onto
SamplingParams."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_INT32 = 2**31 - 1
MAX_N = 128  # choices per request (n, best_of)
MAX_LOGPROBS = 20  # top_logprobs, logprobs (completions), prompt_logprobs
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
MAX_PROMPTS = 1024  # prompts in one completions request
MAX_CHOICES = 1024  # prompts x n in one request
MAX_MESSAGES = 4096
MAX_TOOLS = 256
MAX_IDS = 1024  # stop_token_ids, allowed_token_ids, bad_words
MAX_SHORT = 4096  # names, ids, salts, user
MAX_KWARGS = 64  # chat_template_kwargs entries

Int32 = Annotated[int, Field(ge=0, le=MAX_INT32)]
ShortStr = Annotated[str, Field(max_length=MAX_SHORT)]


class BadRequest(ValueError):
    """A request the server refuses with 400; `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class _Strict(BaseModel):
    """Strict types (no coercion), finite floats, unknown keys ignored as OpenAI ignores them."""
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Open(_Strict):
    """A strictly typed object whose unknown keys are kept (the chat template may read them)."""
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionDefinition(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: ShortStr


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchema(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class _Sampling(_Strict):
    """The fields both endpoints share (OpenAI's, then vLLM's extras)."""
    model: ShortStr | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: str | list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = Field(None, max_length=MAX_STOP_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: ShortStr | None = None
    # extras, as vLLM takes them
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    ignore_eos: bool = False
    stop_token_ids: list[Int32] | None = Field(None, max_length=MAX_IDS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include_stop_str_in_output: bool = False
    # moepipe's per-request choice of the engine's --logprobs-mode (vLLM has only the engine flag)
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] | None = None
    skip_special_tokens: bool = True
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_SHORT)] | None = None
    priority: int = Field(0, ge=-MAX_INT32, le=MAX_INT32)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for k in v or {}:
            if not (k.isascii() and k.isdigit() and len(k) <= 10 and int(k) <= MAX_INT32):
                raise ValueError(f"keys must be token ids (decimal integers), got {k[:20]!r}")
        return v

    def check_supported(self) -> None:
        """400 for every field the engine cannot serve yet: the one place a new feature deletes a line."""
        unsupported = [("skip_special_tokens", not self.skip_special_tokens,
                        "skip_special_tokens=false is not supported")]
        for name, bad, msg in unsupported:
            if bad:
                raise BadRequest(msg, name)
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed with stream=true", "stream_options")
        if self.stream and self.prompt_logprobs is not None:
            raise BadRequest("prompt_logprobs is not available with stream=true", "prompt_logprobs")

    def requested_max_tokens(self) -> int | None:
        """The request's token limit (each request type declares max_tokens with its own default)."""
        return self.max_tokens

    def sampling_kwargs(self, defaults: dict, vocab_size: int) -> dict:
        """SamplingParams keywords but max_tokens; unset values fall back to the model's defaults
        (generation_config.json), then to OpenAI's (temperature 1, top_p 1). top_k of -1 or at
        least the vocabulary is off (0), as in vLLM. Token ids (stop_token_ids, logit_bias keys)
        past the vocabulary are a 400 naming the field."""
        kw = {"temperature": self.temperature if self.temperature is not None else defaults.get("temperature", 1.0),
              "top_p": self.top_p if self.top_p is not None else defaults.get("top_p", 1.0),
              "top_k": self.top_k if self.top_k is not None else defaults.get("top_k", 0),
              "seed": self.seed, "ignore_eos": self.ignore_eos, "n": self.n,
              "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
              "repetition_penalty": self.repetition_penalty if self.repetition_penalty is not None else 1.0,
              "min_tokens": self.min_tokens, "prompt_logprobs": self.prompt_logprobs,
              "logprobs_mode": self.logprobs_mode, "stop": tuple(self.stop or ()) or None,
              "include_stop_str_in_output": self.include_stop_str_in_output}
        if kw["top_k"] == -1 or kw["top_k"] >= vocab_size:
            kw["top_k"] = 0
        if self.min_p is not None:
            kw["min_p"] = self.min_p
        if self.stop_token_ids is not None:
            if any(t >= vocab_size for t in self.stop_token_ids):
                raise BadRequest(f"stop_token_ids must be token ids in [0, {vocab_size})", "stop_token_ids")
            kw["stop_token_ids"] = tuple(self.stop_token_ids)
        if self.logit_bias:
            bias = {int(k): v for k, v in self.logit_bias.items()}
            if max(bias) >= vocab_size:
                raise BadRequest(f"logit_bias: token id {max(bias)} is not in the vocabulary [0, {vocab_size})",
                                 "logit_bias")
            kw["logit_bias"] = bias
        return kw


Prompt = (Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
          | Annotated[list[Int32], Field(min_length=1)]
          | Annotated[list[Annotated[list[Int32], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)])


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT32)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # as vLLM's completions take it

    def check_supported(self) -> None:
        super().check_supported()
        for name, bad, msg in (("best_of", self.best_of not in (None, 1), "best_of is not supported"),
                               ("suffix", bool(self.suffix), "suffix is not supported")):
            if bad:
                raise BadRequest(msg, name)
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise BadRequest(f"n x prompts = {len(self.prompts()) * self.n}: at most {MAX_CHOICES} choices "
                             "per request", "n")

    def sampling_kwargs(self, defaults: dict, vocab_size: int) -> dict:
        """logprobs k per generated token; with echo, the prompt's logprobs too (its top k)."""
        kw = super().sampling_kwargs(defaults, vocab_size)
        kw["logprobs"] = self.logprobs
        if self.echo and self.logprobs is not None:
            kw["prompt_logprobs"] = max(self.logprobs, self.prompt_logprobs or 0)
        return kw

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        out = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
        for i, x in enumerate(out):
            if len(x) == 0:
                raise BadRequest(f"prompt {i} is empty", "prompt")
        return out


class ContentPart(_Open):
    type: ShortStr
    text: str | None = None


class ToolCallFunction(_Strict):
    name: ShortStr
    arguments: str


class ToolCall(_Strict):
    id: ShortStr
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: ShortStr | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: ShortStr | None = None
    reasoning_content: str | None = None

    def plain(self) -> dict:
        """The message as the template reads it: text parts joined by newlines (as vLLM does)."""
        m = self.model_dump(exclude_none=True, by_alias=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise BadRequest(f"content part of type {part.type!r}: only text parts are supported",
                                     "messages")
                texts.append(part.text)
            m["content"] = "\n".join(texts)
        if m["role"] == "developer":
            m["role"] = "system"
        return m

    def chars(self) -> int:
        """Characters of text this message adds to the prompt (at least)."""
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(p.text or "") for p in self.content or ())


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    # extras
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=MAX_KWARGS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        return self

    def check_supported(self) -> None:
        super().check_supported()
        if self.continue_final_message:
            raise BadRequest("continue_final_message is not supported", "continue_final_message")

    def sampling_kwargs(self, defaults: dict, vocab_size: int) -> dict:
        """logprobs: true asks for each generated token's logprob and its top_logprobs alternatives."""
        kw = super().sampling_kwargs(defaults, vocab_size)
        kw["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return kw

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        return [m.plain() for m in self.messages]

    def template_tools(self) -> list[dict] | None:
        """The tools as the client sent them (unknown keys kept), or None when tool_choice is 'none'."""
        if self.tools is None or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_unset=True, by_alias=True) for t in self.tools]

    def text_chars(self) -> int:
        return sum(m.chars() for m in self.messages)
