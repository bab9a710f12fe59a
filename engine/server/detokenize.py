"""Token ids -> text deltas for streaming: incremental detokenization that never emits a partial
UTF-8 character, and the hold-back of text that may turn out to be the start of a stop string."""
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


class StopHoldback:
    """Streams text while stop strings may still end it: `push` returns what is safe to send (all but
    the longest tail that is a proper prefix of a stop string). Whether a stop string ended the text
    is the engine's call (SamplingParams.stop: found across token boundaries, only once min_tokens
    are out); `finish` takes the engine's final text, cut before the stop string."""

    def __init__(self, stops: tuple[str, ...] | list[str] | None):
        self.stops = [s for s in stops or () if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything decoded so far (sent + held back)
        self._sent = 0

    def push(self, delta: str) -> str:
        self.text += delta
        return self._release(len(self.text) - self._held())

    def finish(self, final: str | None = None) -> str:
        """The rest: of `final` (the engine's text on a stop string) or of everything decoded. Text
        already sent stays sent: nothing sent is ever a prefix of a stop string."""
        if final is not None:
            self.text = final
        return self._release(len(self.text))

    def _held(self) -> int:
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
