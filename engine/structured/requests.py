"""The LLM's side of structured output: one GrammarCompiler per engine, made at the first request
that asks (xgrammar is imported only then), compiling each request's grammar before any stage sees
it, and the payload from which stage 0 rebuilds the grammar without compiling it again."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .params import StructuredOutputsParams

if TYPE_CHECKING:
    from .compiler import GrammarCompiler

THINK_END = "</think>"  # Qwen3's end of reasoning: a reasoning-aware grammar applies after it
THINK_START = "<think>"


class GrammarPayload(NamedTuple):
    """What stage 0 needs to follow a request's grammar (travels with the "add" message)."""
    key: tuple  # StructuredOutputsParams.cache_key(): equal grammars share one deserialized copy
    grammar_json: str  # the compiled grammar, xgrammar's serialization
    reasoning_end_id: int | None  # `</think>`: the output starts in reasoning, free until this token


class GrammarRequests:
    """Compiles requests' structured_outputs for one checkpoint; thread-safe."""

    def __init__(self, folder: str | Path | None, vocab_size: int, stop_ids: tuple[int, ...], tokenizer: Any):
        self.folder = Path(folder) if folder is not None else None
        self.vocab_size, self.stop_ids = vocab_size, tuple(stop_ids)
        self.think_end_id = tokenizer.token_to_id(THINK_END) if tokenizer is not None else None
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> "GrammarCompiler":
        with self._lock:
            if self._compiler is None:
                if self.folder is None or not (self.folder / "tokenizer.json").exists():
                    raise ValueError("SamplingParams: structured_outputs needs the checkpoint's tokenizer.json")
                from engine.structured.compiler import GrammarCompiler
                self._compiler = GrammarCompiler(self.folder / "tokenizer.json", self.vocab_size, self.stop_ids)
            return self._compiler

    def payload(self, so: StructuredOutputsParams | None, reasoning: bool = False) -> GrammarPayload | None:
        """None without structure (a request's SamplingParams.structured_outputs); else its grammar
        compiled (a ValueError naming the problem if it cannot be). reasoning: the output starts in
        the model's reasoning."""
        if so is None:
            return None
        text = self.compiler.serialized(so)
        return GrammarPayload(so.cache_key(), text, self.think_end_id if reasoning else None)


def starts_in_reasoning(template_source: str, prompt: str, chat_template_kwargs: dict | None) -> bool:
    """Whether a chat prompt leaves the model in its reasoning: the prompt ends in an open `<think>`
    (templates that open it), or the template switches thinking with `enable_thinking` (Qwen3: the
    model opens it) and the kwargs do not turn it off (off, Qwen3's template closes an empty block)."""
    tail = prompt.rstrip()
    if tail.endswith(THINK_START):
        return True
    if tail.endswith(THINK_END):
        return False
    return "enable_thinking" in template_source and (chat_template_kwargs or {}).get("enable_thinking") is not False
