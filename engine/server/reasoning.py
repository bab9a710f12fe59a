"""Qwen3's reasoning split, as vLLM's `qwen3` reasoning parser: the text before `</think>` is
`reasoning_content`, the text after it `content`. A leading `<think>` is dropped (newer Qwen3 chat
templates put it in the prompt, so the output may start inside the thinking); an output that never
closes its thinking is all reasoning. With thinking off nothing is split: all of it is content."""
from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(text: str, thinking: bool = True) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole output; None for an empty part."""
    if not thinking:
        return None, text or None
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
    reasoning, closed, content = text.partition(THINK_CLOSE)
    return reasoning or None, (content or None) if closed else None


class ReasoningStreamParser:
    """Fed the text deltas of one choice, returns {"reasoning_content": str} and {"content": str}
    delta dicts that join to split_reasoning's parts. A tail that may be the start of a tag split
    across deltas is held back until the next delta (or finish)."""

    def __init__(self, thinking: bool = True):
        self.thinking = thinking
        self._buf = ""
        self._at_start = True  # a leading <think> may still come
        self._done = not thinking  # past </think>: everything is content

    @property
    def reasoning_ended(self) -> bool:
        return self._done

    def feed(self, delta: str) -> list[dict]:
        if self._done:
            return [{"content": delta}] if delta else []
        self._buf += delta
        out: list[dict] = []
        if self._at_start:
            if THINK_OPEN.startswith(self._buf):
                return out  # "", "<", "<th", ... "<think>": wait
            if self._buf.startswith(THINK_OPEN):
                self._buf = self._buf[len(THINK_OPEN):]
            self._at_start = False
        reasoning, closed, content = self._buf.partition(THINK_CLOSE)
        if closed:
            self._done = True
            self._buf = ""
            out += [{"reasoning_content": reasoning}] if reasoning else []
            out += [{"content": content}] if content else []
            return out
        keep = next((n for n in range(min(len(THINK_CLOSE) - 1, len(reasoning)), 0, -1)
                     if reasoning.endswith(THINK_CLOSE[:n])), 0)
        if len(reasoning) > keep:
            out.append({"reasoning_content": reasoning[:len(reasoning) - keep]})
        self._buf = reasoning[len(reasoning) - keep:]
        return out

    def finish(self) -> list[dict]:
        """Held-back text at the end of the output (a partial tag is reasoning text)."""
        rest, self._buf = self._buf, ""
        if self._at_start and rest == THINK_OPEN:
            rest = ""
        return [{"reasoning_content": rest}] if rest and not self._done else []
