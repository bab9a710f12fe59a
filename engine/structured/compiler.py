"""Grammars compiled against the checkpoint's tokenizer through xgrammar (imported lazily: the engine
runs without it until a request asks for structure), with a bounded cache of compiled grammars."""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from engine.structured.params import StructuredOutputsParams

INSTALL_HINT = "structured output needs the 'xgrammar' package (pip install 'moepipe[serve]' or pip install xgrammar)"
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest names the problem
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def import_xgrammar():
    """xgrammar, or an ImportError that names the missing package."""
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT}: {e}") from None
    return xgrammar


def _vocab_type(tokenizer_json: dict, xgr) -> Any:
    """BYTE_LEVEL for GPT-2-style byte-level BPE (Qwen3), BYTE_FALLBACK for sentencepiece-style <0xNN>
    byte tokens, else RAW; read from the decoder, as xgrammar reads it from a transformers tokenizer."""
    decoder = tokenizer_json.get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {d.get("type") for d in steps if isinstance(d, dict)}
    if "ByteLevel" in types:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in types:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _clean_error(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _CPP_PREFIX.sub("", text).strip()


def tokenizer_info(tokenizer_json: str | Path, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    """xgrammar's TokenizerInfo of a tokenizer.json for a model of `vocab_size` logits. Special
    added tokens (other than the stop tokens, which a grammar allows only where it may end) and ids
    past the tokenizer are never allowed. Deterministic: two processes build equal infos."""
    xgr = import_xgrammar()
    from tokenizers import Tokenizer
    if not stop_token_ids:
        raise ValueError("structured output needs at least one stop token id (the checkpoint's eos)")
    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab_size < max(vocab.values()) + 1:
        # ids past the model's vocab can never be sampled; xgrammar takes the first vocab_size
        vocab = {t: i for t, i in vocab.items() if i < vocab_size}
    special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    encoded = [""] * vocab_size  # "" = a token the grammar never allows (padding, special)
    for text, i in vocab.items():
        encoded[i] = "" if text in special else text
    return xgr.TokenizerInfo(encoded, _vocab_type(json.loads(tok.to_str()), xgr), vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids))


class GrammarCompiler:
    """Compiles StructuredOutputsParams to xgrammar CompiledGrammars for one tokenizer; thread-safe.

    `vocab_size` is the model's logit width (config.vocab_size, may exceed the tokenizer's), which is
    also the bitmask width in bits: int32 [rows, ceil(vocab_size / 32)] (tokenizer_info says which
    tokens a grammar may ever allow)."""

    def __init__(self, tokenizer_json: str | Path, vocab_size: int, stop_token_ids: list[int] | tuple[int, ...],
                 cache_size: int = 256, max_threads: int = 8):
        xgr = import_xgrammar()
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.tokenizer_info = tokenizer_info(tokenizer_json, vocab_size, self.stop_token_ids)
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple, list] = OrderedDict()  # key -> [compiled, serialized JSON or None]
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (cache misses)

    @classmethod
    def from_folder(cls, folder: str | Path, vocab_size: int | None = None) -> "GrammarCompiler":
        """From a checkpoint folder: tokenizer.json, config.json's vocab_size, the eos ids."""
        from loader.model_files import stop_token_ids
        folder = Path(folder)
        if vocab_size is None:
            vocab_size = int(json.loads((folder / "config.json").read_text())["vocab_size"])
        return cls(folder / "tokenizer.json", vocab_size, stop_token_ids(folder))

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The CompiledGrammar (cached by content); a ValueError naming the problem when xgrammar
        cannot compile it (bad schema, unsupported keyword, regex or EBNF syntax)."""
        return self._entry(params)[0]

    def serialized(self, params: StructuredOutputsParams) -> str:
        """compile()'s grammar as xgrammar's JSON (cached beside it): another process rebuilds it with
        CompiledGrammar.deserialize_json and the same tokenizer_info, far faster than compiling."""
        entry = self._entry(params)
        if entry[1] is None:
            entry[1] = entry[0].serialize_json()
        return entry[1]

    def _entry(self, params: StructuredOutputsParams) -> list:
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            entry = [self._compile(params), None]
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{params.kind}: cannot compile: {_clean_error(e)}") from None
        with self._lock:
            self.compiles += 1
            self._cache[key] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry

    def _compile(self, p: StructuredOutputsParams) -> Any:
        any_ws = not p.disable_any_whitespace
        c = self._compiler
        if p.json is not None:
            return c.compile_json_schema(json.dumps(length_limits_as_patterns(p.json)), any_whitespace=any_ws)
        if p.json_object:
            return c.compile_json_schema('{"type": "object"}', any_whitespace=any_ws)
        if p.regex is not None:
            return c.compile_regex(p.regex)
        if p.choice is not None:
            return c.compile_structural_tag(choice_structural_tag(p.choice))
        if p.grammar is not None:
            return c.compile_grammar(p.grammar)
        return c.compile_structural_tag(p.structural_tag)


# JSON string content without escapes: no quote, backslash or control character
_PLAIN_STRING_CHARS = r'[^"\\\x00-\x1f]'
_DATA_KEYWORDS = ("enum", "const", "default", "examples")  # their values are data, not schemas


def length_limits_as_patterns(schema: Any) -> Any:
    """A copy where string schemas with minLength/maxLength (and no pattern/format) carry the same
    limits as a `pattern` instead. xgrammar (0.2.9) compiles a length-limited string to "any
    characters but quote, backslash, CR and LF", which lets raw control characters (a tab, \\x04)
    into the JSON and so makes invalid JSON; the pattern allows the same strings minus those."""
    if isinstance(schema, list):
        return [length_limits_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else length_limits_as_patterns(v) for k, v in schema.items()}
    lo, hi = out.get("minLength"), out.get("maxLength")
    if (out.get("type") == "string" and (lo is not None or hi is not None) and "pattern" not in out
            and "format" not in out and all(v is None or isinstance(v, int) for v in (lo, hi))):
        out.pop("minLength", None), out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_STRING_CHARS}{{{lo or 0},{'' if hi is None else hi}}}$"
    return out


def choice_structural_tag(choices: list[str]) -> dict:
    """One of the strings, verbatim (no escaping to get wrong: each is a const string)."""
    return {"type": "structural_tag",
            "format": {"type": "or", "elements": [{"type": "const_string", "value": c} for c in choices]}}
