"""Turning a request's TokenEvents into vLLM-shaped outputs: logprob dicts from the wire tuples,
and one RequestOutput with its n CompletionOutputs."""
from __future__ import annotations

from .params import CompletionOutput, Logprob, RequestOutput

WireLogprob = tuple[float, int, list[int], list[float]]  # (logprob, rank, top ids, top logprobs)


def logprob_dict(token: int, entry: WireLogprob) -> dict[int, Logprob]:
    """{token: its (logprob, rank), then each top-k token: (logprob, its place 1..k)}."""
    lp, rank, ids, lps = entry
    out = {token: Logprob(lp, rank)}
    for i, (t, v) in enumerate(zip(ids, lps)):
        out.setdefault(t, Logprob(v, i + 1))
    return out


def prompt_logprob_list(prompt: list[int], entries: list[WireLogprob]) -> list[dict[int, Logprob] | None]:
    """None for the first prompt token (no prefix), then a dict per later token."""
    return [None] + [logprob_dict(t, e) for t, e in zip(prompt[1:], entries)]


class OutputBuilder:
    """Collects the events of one prompt's n samples."""

    def __init__(self, request_id: str, prompt: list[int], n: int, want_logprobs: bool):
        self.request_id, self.prompt = request_id, prompt
        self.outs = [CompletionOutput(i, None, [], 0.0 if want_logprobs else None, [] if want_logprobs else None)
                     for i in range(n)]
        self.prompt_logprobs = None
        self.texts: list[str | None] = [None] * n  # set by a stop string (the text cut before it)

    def add(self, index: int, ev) -> None:
        o = self.outs[index]
        o.token_ids.append(ev.token_id)
        if ev.logprobs is not None and o.logprobs is not None:
            o.logprobs.append(logprob_dict(ev.token_id, ev.logprobs))
            o.cumulative_logprob += ev.logprobs[0]
        if ev.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = prompt_logprob_list(self.prompt, ev.prompt_logprobs)
        if ev.finish_reason is not None:
            o.finish_reason, o.stop_reason = ev.finish_reason, ev.stop_reason
            if ev.text is not None:
                self.texts[index] = ev.text

    def build(self, tokenizer) -> RequestOutput:
        for o, text in zip(self.outs, self.texts):
            o.text = text if text is not None else (tokenizer.decode(o.token_ids) if tokenizer is not None else None)
        first = self.outs[0]
        return RequestOutput(self.request_id, self.prompt, first.token_ids, first.text, first.finish_reason,
                             self.outs, self.prompt_logprobs)
