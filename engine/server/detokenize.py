"""Token ids -> text deltas for streaming: incremental detokenization that never emits a partial
UTF-8 character, and OpenAI stop strings (cut out of the text, found across token boundaries)."""
from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decode of an incomplete UTF-8 sequence ends with


class IncrementalDetokenizer:
    """Decodes a window [prefix, end) of the ids on each token (vLLM's offsets), so the cost per
    token stays constant; text is only released once it no longer ends in a partial character."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: the last clean boundary before `_read`
        self._read = 0  # ids before this were released as text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """The rest at the end of the sequence, even if it ends in a partial character."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._tok.decode(self.ids[self._prefix:self._read])
        text = self._tok.decode(self.ids[self._prefix:])
        if len(text) > len(before) and (final or not text.endswith(REPLACEMENT)):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(before):]
        if final:
            self._read = len(self.ids)
        return ""


class StopStrings:
    """Holds back the text that could still be the start of a stop string; `push` returns what is
    safe to send and whether a stop string was hit (the text from it on is dropped)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything kept so far (sent + held back)
        self._sent = 0
        self.hit: str | None = None

    def push(self, delta: str) -> tuple[str, bool]:
        if self.hit is not None:
            return "", True
        start = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        if not self.stops:
            return self._release(len(self.text)), False
        found = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if found:
            i, self.hit = min(found)
            self.text = self.text[:i]
            return self._release(i), True
        return self._release(len(self.text) - self._held()), False

    def flush(self) -> str:
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out, self._sent = self.text[self._sent:upto], upto
        return out
