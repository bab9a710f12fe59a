"""The sampling side of the response bodies: a request's prompts x n samples as choices (index
prompt x n + sample, as OpenAI and vLLM order them), each choice's text with echo, its logprobs,
stop_reason and prompt_logprobs, and the usage that counts each prompt once and every choice's
tokens. One formatter serves a whole response and each chunk of a stream (Piece and Result alike)."""
from __future__ import annotations

from .generation import Piece, Result
from .logprobs import CompletionLogprobs, TokenStrings, chat_content, merge, vllm_prompt_logprobs

Out = Piece | Result


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Choices:
    """What every choice of a request shares: its prompt (ids, text), n, and the per-choice state a
    stream needs (whether the choice's first chunk went out)."""

    def __init__(self, strings: TokenStrings, prompt_ids: list[list[int]], n: int, want_prompt_logprobs: bool):
        self.strings, self.prompt_ids, self.n = strings, prompt_ids, n
        self.want_prompt_logprobs = want_prompt_logprobs
        self.started = [False] * (len(prompt_ids) * n)

    def prompt_of(self, index: int) -> int:
        return index // self.n

    def prompt_tokens(self) -> int:
        return sum(len(x) for x in self.prompt_ids)

    def _first(self, index: int) -> bool:
        first, self.started[index] = not self.started[index], True
        return first

    def extras(self, index: int, out: Out, first: bool, with_prompt: bool = True) -> dict:
        """vLLM's fields beside OpenAI's: stop_reason on the last chunk; prompt_logprobs on the first."""
        d = {}
        if out.finish_reason is not None:
            d["stop_reason"] = out.stop_reason
        if first and with_prompt and self.want_prompt_logprobs:
            d.update(self.prompt_logprobs(index, out))
        return d

    def prompt_logprobs(self, index: int, out: Out) -> dict:
        """{"prompt_logprobs": ...} of choice index's prompt when asked, else {}."""
        if not self.want_prompt_logprobs:
            return {}
        return {"prompt_logprobs": vllm_prompt_logprobs(self.strings, self.prompt_ids[self.prompt_of(index)],
                                                        out.prompt_logprobs)}


class CompletionChoices(Choices):
    """/v1/completions choices: with echo the prompt's text (and its logprobs) come first."""

    def __init__(self, strings: TokenStrings, prompt_ids: list[list[int]], prompt_texts: list[str], n: int,
                 echo: bool, logprobs: int | None, want_prompt_logprobs: bool):
        super().__init__(strings, prompt_ids, n, want_prompt_logprobs)
        self.prompt_texts, self.echo = prompt_texts, echo
        self.lp = [CompletionLogprobs(strings) for _ in self.started] if logprobs is not None else None

    def choice(self, index: int, out: Out) -> dict:
        first = self._first(index)
        text, logprobs = out.text, None
        if first and self.echo:
            p = self.prompt_of(index)
            text = self.prompt_texts[p] + text
            if self.lp is not None:
                logprobs = self.lp[index].prompt(self.prompt_ids[p], out.prompt_logprobs)
        if self.lp is not None:
            logprobs = merge(logprobs, self.lp[index].chunk(out.token_ids, out.logprobs or []))
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                **self.extras(index, out, first)}


class ChatChoices(Choices):
    """/v1/chat/completions choices' sampling parts: logprobs.content and the vLLM extras."""

    def logprobs(self, out: Out) -> dict | None:
        if out.logprobs is None:
            return None
        return {"content": chat_content(self.strings, out.token_ids, out.logprobs)}

    def sampling_fields(self, index: int, out: Out) -> dict:
        """logprobs, finish_reason and stop_reason of one choice (its message or delta is the
        caller's; prompt_logprobs go in the response's top level, as vLLM's chat puts them)."""
        first = self._first(index)
        return {"logprobs": self.logprobs(out), "finish_reason": out.finish_reason,
                **self.extras(index, out, first, with_prompt=False)}
