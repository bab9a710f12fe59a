"""Logprobs in the OpenAI response shapes, from the engine's wire entries (logprob, rank, top ids, top
logprobs): chat's `logprobs.content[]` of {token, logprob, bytes, top_logprobs}, completions'
{tokens, token_logprobs, top_logprobs, text_offset} (with echo, the prompt's first), and vLLM's
`prompt_logprobs` extra. A token's text is its bytes decoded (a partial UTF-8 character reads as
U+FFFD, as in vLLM); its bytes are the exact ones (byte-level BPE pieces mapped back)."""
from __future__ import annotations

from ..outputs import WireLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf: a token the sampler filtered out reads as this (as in vLLM)


def _clamp(v: float) -> float:
    return max(float(v), MIN_LOGPROB)


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the character each byte is written as in a
    byte-level BPE vocabulary -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


class TokenStrings:
    """Token id -> its text and bytes, cached per id."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        inner = getattr(tokenizer, "_tok", None)  # loader.model_files.Tokenizer wraps a tokenizers.Tokenizer
        self._inner = inner if inner is not None and hasattr(inner, "id_to_token") else None
        self._added = set(self._inner.get_added_tokens_decoder()) if self._inner is not None else set()
        self._bytes_of = _byte_decoder()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _entry(self, tid: int) -> tuple[str, list[int]]:
        got = self._cache.get(tid)
        if got is None:
            raw = self._raw(tid)
            got = self._cache[tid] = (raw.decode("utf-8", errors="replace"), list(raw))
        return got

    def _raw(self, tid: int) -> bytes:
        piece = self._inner.id_to_token(tid) if self._inner is not None else None
        if piece is None:  # no vocabulary at hand: what decode gives
            return (self._tok.decode([tid]) if self._tok is not None else "").encode("utf-8")
        if tid not in self._added and all(c in self._bytes_of for c in piece):
            return bytes(self._bytes_of[c] for c in piece)
        return piece.encode("utf-8")  # added and special tokens are stored as their text

    def text(self, tid: int) -> str:
        return self._entry(tid)[0]

    def bytes(self, tid: int) -> list[int]:
        return self._entry(tid)[1]


def chat_content(strings: TokenStrings, token_ids: list[int], entries: list[WireLogprob]) -> list[dict]:
    """OpenAI chat `logprobs.content`: one entry per generated token, its top_logprobs the k best
    (k = the request's top_logprobs; the sampled token is among them only if it ranks there)."""
    def one(tid: int, lp: float) -> dict:
        return {"token": strings.text(tid), "logprob": _clamp(lp), "bytes": strings.bytes(tid)}
    return [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in zip(ids, lps)]}
            for t, (lp, _rank, ids, lps) in zip(token_ids, entries)]


class CompletionLogprobs:
    """OpenAI completions `logprobs` for one choice, built across chunks: text_offset keeps
    counting from the previous chunk (and from the prompt's start with echo)."""

    def __init__(self, strings: TokenStrings):
        self.strings, self.offset = strings, 0

    def _top(self, tid: int, lp: float, ids: list[int], lps: list[float]) -> dict[str, float]:
        """The k best, then the token itself (at most k + 1 entries, as OpenAI); two tokens of one
        text keep the higher logprob."""
        top: dict[str, float] = {}
        for i, v in zip(ids, lps):
            top.setdefault(self.strings.text(i), _clamp(v))
        top.setdefault(self.strings.text(tid), _clamp(lp))
        return top

    def chunk(self, token_ids: list[int], entries: list[WireLogprob | None]) -> dict:
        """The four lists for these tokens; an entry of None (the prompt's first token) has no logprob."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(token_ids, entries):
            text = self.strings.text(t)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            out["token_logprobs"].append(None if e is None else _clamp(e[0]))
            out["top_logprobs"].append(None if e is None else self._top(t, e[0], e[2], e[3]))
        return out

    def prompt(self, prompt_ids: list[int], entries: list[WireLogprob] | None) -> dict:
        """The echoed prompt's logprobs: None for the first token (no prefix), then each token's
        given the ones before it (entries None: the request asked for no logprobs of the prompt)."""
        return self.chunk(prompt_ids, [None, *(entries or [None] * (len(prompt_ids) - 1))])


def merge(a: dict | None, b: dict | None) -> dict | None:
    """Two completions logprobs objects of consecutive text, as one."""
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] for k in a}


def vllm_prompt_logprobs(strings: TokenStrings, prompt_ids: list[int],
                         entries: list[WireLogprob] | None) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then {token id: {logprob, rank,
    decoded_token}} holding that token and the top k."""
    if entries is None:
        return None
    out: list[dict | None] = [None]
    for t, (lp, rank, ids, lps) in zip(prompt_ids[1:], entries):
        d = {str(t): {"logprob": _clamp(lp), "rank": rank, "decoded_token": strings.text(t)}}
        for place, (i, v) in enumerate(zip(ids, lps), 1):
            d.setdefault(str(i), {"logprob": _clamp(v), "rank": place, "decoded_token": strings.text(i)})
        out.append(d)
    return out
