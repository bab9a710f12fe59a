"""What the engine reads beside the weights: where the model lives (folder or hub id), its stop ids
(generation_config.json, then config.json) and its tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

from model.config import ConfigError


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder, hub repo id or None). A folder is used as is; an ORG/NAME id is fetched."""
    from loader.hub import fetch_metadata, is_hub_id
    p = Path(model)
    if p.is_dir():
        return p, None
    if p.exists():
        raise ConfigError(f"{model}: expected a model folder, got a file")
    if not is_hub_id(model):
        raise ConfigError(f"{model}: no such model folder (and not a hub id of the form ORG/NAME)")
    return fetch_metadata(model, revision), model


def stop_token_ids(folder: Path) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.exists():
            try:
                eos = json.loads(f.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f}: not valid JSON ({e})") from None
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


class Tokenizer:
    """tokenizer.json through the `tokenizers` library (no BOS is added, as for Qwen3)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok
        self._tok = _Tok.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def max_token_chars(self) -> int:
        """The most characters one token stands for (a byte-level token's string has one character
        per byte, and a character is at least a byte): a text of n characters has at least
        n / max_token_chars() tokens."""
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)


def load_tokenizer(folder: Path) -> Tokenizer | None:
    f = folder / "tokenizer.json"
    return Tokenizer(f) if f.exists() else None
