"""Qwen3's (Hermes-style) tool calls, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, parsed
out of generated text whole or from streamed deltas, as vLLM's `hermes` parser and SGLang's `qwen25`
detector do, except that a `</tool_call>` inside a JSON string does not end the call. A call the output
ends inside of still counts, as vLLM's. A call whose body is not a JSON object with a string `name` and
an object `arguments` stays in the content verbatim. Content is the text around the calls, stripped;
None when empty."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


@dataclass
class _BodyScan:
    """Where a call's body ends: at the first `</tool_call>` outside a JSON string (an argument may
    hold the text "</tool_call>"), found incrementally as text arrives."""
    pos: int = 0
    in_string: bool = False
    escaped: bool = False

    def find_close(self, text: str, final: bool) -> int:
        """Index of the closing tag in text, or -1 (scanned up to a possible partial tag unless final)."""
        while self.pos < len(text):
            ch = text[self.pos]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch == "<":
                if text.startswith(CALL_CLOSE, self.pos):
                    return self.pos
                if not final and CALL_CLOSE.startswith(text[self.pos:]):
                    return -1  # may be the start of the tag: wait for more text
            self.pos += 1
        return -1


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def to_openai(self) -> dict:
        """message.tool_calls[i] of a chat completion."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call_body(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call's body, or None when it is not a valid call."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters"))  # SGLang also takes `parameters`
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def parse_tool_calls(text: str, new_id: Callable[[], str] = new_call_id) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a whole generated text."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        body_at = start + len(CALL_OPEN)
        end = _BodyScan(body_at).find_close(text, final=True)
        body, after = (text[body_at:end], end + len(CALL_CLOSE)) if end >= 0 else (text[body_at:], len(text))
        parsed = parse_call_body(body)
        kept.append(text[pos:after] if parsed is None else text[pos:start])  # an invalid call stays
        if parsed is not None:
            calls.append(ToolCall(new_id(), *parsed))
        pos = after
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return content or None, calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (kept back: it may be
    the start of the tag, split across deltas)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallStreamParser:
    """Fed the text deltas of one choice, returns OpenAI `delta` dicts: {"content": str} and
    {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]} followed by
    {"tool_calls": [{"index", "function": {"arguments": str}}]}. Joined, the content equals
    parse_tool_calls' content and each call's argument fragments its arguments. A call is held back
    until its `</tool_call>` (or the end), since only then is it known to be valid."""

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self._new_id = new_id
        self._buf = ""
        self._in_call = False
        self._started = False  # non-whitespace content was sent (leading whitespace is dropped)
        self._pending_ws = ""  # whitespace held until more content follows (trailing is dropped)
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> list[dict]:
        self._buf += delta
        out: list[dict] = []
        while True:
            if self._in_call:
                end = self._scan.find_close(self._buf, final=False)
                if end < 0:
                    return out
                self._end_call(self._buf[:end], CALL_CLOSE, out)
                self._buf = self._buf[end + len(CALL_CLOSE):]
            else:
                start = self._buf.find(CALL_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buf, CALL_OPEN)
                    self._content(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._content(self._buf[:start], out)
                self._buf = self._buf[start + len(CALL_OPEN):]
                self._in_call = True
                self._scan = _BodyScan()

    def finish(self) -> list[dict]:
        """The rest at the end of the output: a call the output ended inside of, or held-back text."""
        out: list[dict] = []
        if self._in_call:
            self._end_call(self._buf, "", out)
        else:
            self._content(self._buf, out)
        self._buf = ""
        return out

    def _end_call(self, body: str, close: str, out: list[dict]) -> None:
        self._in_call = False
        parsed = parse_call_body(body)
        if parsed is None:
            self._content(CALL_OPEN + body + close, out)
            return
        call = ToolCall(self._new_id(), *parsed)
        index = len(self.calls)
        self.calls.append(call)
        out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})

    def _content(self, text: str, out: list[dict]) -> None:
        if not self._started:
            text = text.lstrip()
        if not text:
            return
        full = self._pending_ws + text
        body = full.rstrip()
        self._pending_ws = full[len(body):]
        if body:
            self._started = True
            out.append({"content": body})

