"""Helpers shared by the commands: the default model, printing a token stream and a summary."""
from __future__ import annotations

import sys


def default_model() -> str:
    from loader.writer import ensure_cached_preset
    return str(ensure_cached_preset("tiny"))


def parse_prompt_ids(text: str | None) -> list[int] | None:
    """'5,6,7' -> [5, 6, 7]; None -> None; '' or junk -> ValueError naming --prompt-ids."""
    if text is None:
        return None
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise ValueError("--prompt-ids is empty: give at least one token id")
    return ids


def stream_print(events, tokenizer) -> list[int]:
    """Print tokens as they come: text (never half a character: a character split across tokens
    waits for its last token), or ids without a tokenizer."""
    from ..server.detokenize import IncrementalDetokenizer
    out: list[int] = []
    detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
    for _, tok, _ in events:
        out.append(tok)
        if detok is not None:
            print(detok.add(tok), end="", flush=True)
        else:
            print(tok, end=" ", flush=True)
    if detok is not None:
        print(detok.flush(), end="")
    print()
    return out


def print_summary(prompt_len: int, new: list[int], seconds: float, stages: list[dict]) -> None:
    busy = ", ".join(f"stage {s['rank']} {s['busy_ms'] / 1e3:.2f} s" for s in stages)
    print(f"prompt tokens: {prompt_len}, new tokens: {len(new)}, {len(new) / max(seconds, 1e-9):.1f} tokens/s "
          f"in {seconds:.2f} s; busy: {busy}", file=sys.stderr)
