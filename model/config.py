"""ModelConfig: a Qwen3-MoE config.json validated once, accepting the v4 and v5 key spellings."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """A config.json value is missing, malformed or unsupported."""


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "float": torch.float32,
           "half": torch.float16}


def parse_dtype(name: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"{where}: unknown dtype {name!r} (expected one of {sorted(set(_DTYPES))})")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters; rope_type is 'default' or 'yarn' (static, HF >= 4.56 semantics)."""
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = "<dict>"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -----------------------------------------------------------------------------
    def is_sparse(self, layer: int) -> bool:
        """HF rule: layer i is MoE iff not in mlp_only_layers, E > 0 and (i+1) % step == 0."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token_per_layer(self, dtype: torch.dtype) -> int:
        return 2 * self.kv_size * torch.empty((), dtype=dtype).element_size()

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, lenient: bool = False) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(raw, source=str(path), lenient=lenient)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>", lenient: bool = False) -> "ModelConfig":
        """Validate a config.json dict. lenient=True (used by `plan`) tolerates a missing
        model_type and vocab_size (151936 assumed), as in the user's hand-written config."""
        r = _Reader(d, source)
        mt = d.get("model_type")
        if mt is None and not lenient:
            raise ConfigError(f"{source}: missing key 'model_type' (expected 'qwen3_moe')")
        if mt is not None and mt != "qwen3_moe":
            raise ConfigError(f"{source}: unsupported model_type {mt!r} (this engine runs 'qwen3_moe')")
        if d.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Qwen3-MoE has no biases)")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")

        H = r.int("hidden_size")
        nh = r.int("num_attention_heads")
        nkv = r.int("num_key_value_heads", default=nh)
        if nh % nkv:
            raise ConfigError(f"{source}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
        head_dim = r.int("head_dim", default=H // nh)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim={head_dim} must be even for RoPE")
        L = r.int("num_hidden_layers")
        E = r.int("num_experts", "num_local_experts", default=128, minimum=0)
        k = r.int("num_experts_per_tok", default=8)
        if E and k > E:
            raise ConfigError(f"{source}: num_experts_per_tok={k} exceeds num_experts={E}")
        mlp_only = d.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
            raise ConfigError(f"{source}: 'mlp_only_layers' must be a list of layer indices, got {mlp_only!r}")
        bad = [i for i in mlp_only if not 0 <= i < L]
        if bad:
            raise ConfigError(f"{source}: 'mlp_only_layers' has indices outside [0, {L}): {bad}")
        vocab = r.int("vocab_size", default=151936 if lenient else None)
        dt_name = d.get("torch_dtype", d.get("dtype"))
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=vocab, hidden_size=H, num_hidden_layers=L, num_attention_heads=nh,
            num_key_value_heads=nkv, head_dim=head_dim,
            intermediate_size=r.int("intermediate_size", default=6144),
            moe_intermediate_size=r.int("moe_intermediate_size", default=768),
            num_experts=E, num_experts_per_tok=k,
            norm_topk_prob=r.bool("norm_topk_prob", default=False),
            decoder_sparse_step=r.int("decoder_sparse_step", default=1),
            mlp_only_layers=tuple(mlp_only),
            rms_norm_eps=r.float("rms_norm_eps", default=1e-6),
            rope=_parse_rope(d, r, source),
            max_position_embeddings=r.int("max_position_embeddings", default=32768),
            tie_word_embeddings=r.bool("tie_word_embeddings", default=False),
            dtype=parse_dtype(dt_name, f"{source}: torch_dtype") if dt_name is not None else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids, source=source, extra=dict(d),
        )


class _Reader:
    """Typed access to config keys with error messages that name the file and key."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def _get(self, names: tuple[str, ...], default: Any):
        for n in names:
            if n in self.d and self.d[n] is not None:
                return n, self.d[n]
        if default is None:
            raise ConfigError(f"{self.source}: missing key {names[0]!r}"
                              + (f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""))
        return names[0], default

    def int(self, *names: str, default: Any = None, minimum: int = 1) -> int:
        n, v = self._get(names, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{self.source}: key {n!r} must be an integer >= {minimum}, got {v!r}")
        return v

    def float(self, *names: str, default: Any = None) -> float:
        n, v = self._get(names, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{self.source}: key {n!r} must be a positive number, got {v!r}")
        return float(v)

    def bool(self, *names: str, default: Any = None) -> bool:
        n, v = self._get(names, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.source}: key {n!r} must be true or false, got {v!r}")
        return v


def _parse_rope(d: dict, r: _Reader, source: str) -> RopeConfig:
    """Fold v4 rope_theta/rope_scaling and v5 rope_parameters into one RopeConfig."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    block = params if isinstance(params, dict) else scaling
    if block is not None and not isinstance(block, dict):
        raise ConfigError(f"{source}: 'rope_scaling'/'rope_parameters' must be an object, got {block!r}")
    block = dict(block or {})
    theta = block.get("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise ConfigError(f"{source}: key 'rope_theta' must be a number > 1, got {theta!r}")
    rtype = block.get("rope_type", block.get("type", "default"))
    if rtype == "default" or (not block or rtype is None):
        return RopeConfig(theta=float(theta))
    if rtype != "yarn":
        raise ConfigError(f"{source}: rope type {rtype!r} is not supported (expected 'default' or 'yarn')")
    key = "rope_parameters" if isinstance(params, dict) else "rope_scaling"
    max_pos = d.get("max_position_embeddings", 32768)
    orig = block.get("original_max_position_embeddings", max_pos)
    factor = block.get("factor")
    if factor is None:
        factor = max_pos / orig
    for name, v in (("factor", factor), ("original_max_position_embeddings", orig)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{source}: key '{key}.{name}' must be a positive number, got {v!r}")
    return RopeConfig(
        theta=float(theta), rope_type="yarn", factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(block.get("beta_fast") or 32.0), beta_slow=float(block.get("beta_slow") or 1.0),
        mscale=block.get("mscale"), mscale_all_dim=block.get("mscale_all_dim"),
        attention_factor=block.get("attention_factor"), truncate=bool(block.get("truncate", True)))
