"""A chat choice's generated text as OpenAI fields: `reasoning_content` split from `content` at
Qwen3's `</think>` (only when the prompt left the model thinking), then Qwen3 tool calls parsed out
of the content (only when tools are offered), whole (`message`) or as streamed `delta`s."""
from __future__ import annotations

from .reasoning import ReasoningStreamParser, split_reasoning
from .tool_parser import ToolCallStreamParser, parse_tool_calls


def chat_message(text: str, thinking: bool, parse_tools: bool, single_call: bool = False) -> tuple[dict, bool]:
    """(the assistant `message`, whether it holds tool calls)."""
    reasoning, content = split_reasoning(text, thinking)
    msg: dict = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    if parse_tools and content is not None:
        content, calls = parse_tool_calls(content)
        calls = calls[:1] if single_call else calls
        msg["content"] = content
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
            return msg, True
    return msg, False


def finish_reason(reason: str | None, called: bool) -> str | None:
    """"tool_calls" for an output that ended (not cut by length) with tool calls, as OpenAI's."""
    return "tool_calls" if called and reason == "stop" else reason


class ChatDeltas:
    """Fed a choice's text deltas, returns OpenAI `delta` dicts ({"reasoning_content"}, {"content"},
    {"tool_calls": [...]}) that join to chat_message's fields."""

    def __init__(self, thinking: bool, parse_tools: bool, single_call: bool = False):
        self.reasoning = ReasoningStreamParser(thinking)
        self.tools = ToolCallStreamParser() if parse_tools else None
        self.single_call = single_call

    @property
    def called(self) -> bool:
        return self.tools is not None and bool(self.tools.calls)

    def feed(self, text: str) -> list[dict]:
        return self._content(self.reasoning.feed(text) if text else [], last=False)

    def finish(self) -> list[dict]:
        return self._content(self.reasoning.finish(), last=True)

    def _content(self, deltas: list[dict], last: bool) -> list[dict]:
        if self.tools is None:
            return [d for d in deltas if next(iter(d.values()))]
        out = []
        for d in deltas:
            out += self._tools(self.tools.feed(d["content"])) if "content" in d else [d]
        return out + (self._tools(self.tools.finish()) if last else [])

    def _tools(self, deltas: list[dict]) -> list[dict]:
        if not self.single_call:
            return deltas
        return [d for d in deltas if "tool_calls" not in d or d["tool_calls"][0]["index"] == 0]
