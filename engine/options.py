"""EngineOptions: every engine option declared once. The LLM keyword arguments, the CLI flags (help
and defaults from the field metadata) and the torchrun path all build and validate one of these."""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

ATTENTION_CHOICES = ("ref", "sdpa", "fa", "split", "auto")
LOAD_FORMATS = ("auto", "dummy")


def _opt(default: Any, help: str, type: Any = None, choices: tuple | None = None, flag: str | None = None,
         metavar: str | None = None) -> Any:
    meta = {"help": help, "type": type, "choices": choices, "flag": flag, "metavar": metavar}
    return field(default=default, metadata=meta)


def parse_layers(text: str | None) -> list[int] | str | None:
    """'25,23' -> [25, 23]; 'auto' -> 'auto'; '' or None -> None (even split)."""
    if text is None or text.strip() == "":
        return None
    if text.strip() == "auto":
        return "auto"
    try:
        return [int(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated integers like 25,23, or 'auto'") from None


@dataclass(frozen=True)
class EngineOptions:
    stages: int = _opt(1, "pipeline stages (one process, and on CUDA one GPU, each)", int)
    device: str | None = _opt(None, "cuda or cpu (default: cuda when available)", str, ("cuda", "cpu"))
    dtype: Any = _opt(None, "bfloat16 | float16 | float32 (default bf16 on cuda, fp32 on cpu)", str)
    layers: list[int] | str | None = _opt(None, "layers per stage, e.g. 25,23, or 'auto' (default: even split)",
                                          parse_layers, metavar="N,N|auto")
    # 64: a block holds a whole 64-key tile, so Hopper's prefill kernel loads K/V by TMA (16 leaves
    # it gathering rows, the slower path of bench/bench_attention.py); costs at most 63 slots a sequence
    block_size: int = _opt(64, "tokens per KV block (a power of two)", int)
    kv_cache_gib: float | None = _opt(None, "KV pool per stage in GiB (default: measured from free memory)", float)
    gpu_memory_utilization: float = _opt(0.9, "fraction of each GPU's memory the engine may use, in (0, 1]", float)
    # 512 sequences (the largest decode graph) and 16k-token steps (vLLM's offline default on large
    # cards), for `serve` too, where vLLM takes 8k: more sequences decode beside each prefill chunk
    # and a chunk's MoE reads each expert's weights once for more tokens, so prompts queued behind
    # running streams are prefilled in less time in all, which those streams wait through
    # (BENCHMARKS.md, "Serving"); --max-step-ms bounds a single step instead
    max_num_seqs: int = _opt(512, "most sequences running at once", int)
    max_num_batched_tokens: int = _opt(16384, "token budget per step (the prefill chunk)", int)
    # off by default: the bound trades time to first token for time per output token; its cost model
    # (engine/runtime/chunking.py StepCost) is fitted on one card and model, and calibrated by stage
    # 0's measured steps to this one
    max_step_ms: float = _opt(0.0, "while sequences decode, a step's prefill tokens are cut so that its time, as the "
                              "step-cost model predicts it (calibrated by the measured steps), stays within this "
                              "many ms (decodes always run; a prefill with nothing decoding is not bounded; a step the "
                              "bound would leave under a quarter of the token budget's prefill rate takes the "
                              "budget's chunk; 0: off, only the token budget)", float)
    max_model_len: int | None = _opt(None, "context limit in tokens (default: the model's max_position_embeddings)",
                                     int)
    attention: str | None = _opt(None, "attention backend (default: auto on cuda, ref on cpu)", str,
                                 ATTENTION_CHOICES)
    dynamic_chunks: bool = _opt(True, "prefill chunks shrink as their prefix grows (off: full-budget chunks)",
                                flag="--no-dynamic-chunks")
    enable_prefix_caching: bool = _opt(True, "no automatic prefix caching (by default a request reuses the KV "
                                       "blocks of the longest prompt prefix already computed)",
                                       flag="--no-enable-prefix-caching")
    seed: int = _opt(0, "seed of unseeded sampling", int)
    revision: str | None = _opt(None, "hub revision (branch, tag or commit) of a hub model", str)
    enforce_eager: bool = _opt(False, "no CUDA graphs for decode")
    async_scheduling: bool = _opt(True, "queue a decode's next step before its token reaches the host (off: wait "
                                  "for each token first)", flag="--no-async-scheduling")
    verbose: bool = _opt(True, "load progress on stderr (off: --quiet)", flag="--quiet")
    load_timeout_s: float = _opt(3600.0, "seconds the stages may take to load", float)
    load_format: str = _opt("auto", "auto: read the checkpoint's weights; dummy: random weights of its config",
                            str, LOAD_FORMATS)
    logprobs_mode: str = _opt("raw_logprobs", "what logprobs describe unless a request says (SamplingParams."
                              "logprobs_mode): raw_logprobs, log_softmax of the model's logits; processed_logprobs, "
                              "of the logits sampled from (after penalties, bias, temperature, top-k/top-p/min-p)",
                              str, ("raw_logprobs", "processed_logprobs"))

    def validate(self) -> "EngineOptions":
        """Raise ValueError naming the option and its limit; returns self."""
        def bad(name: str, msg: str):
            raise ValueError(f"{name} {msg}")

        def integer(name: str, lo: int, none_ok: bool = False):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"must be an integer >= {lo}, got {v!r}")

        integer("stages", 1)
        integer("block_size", 1)
        if self.block_size & (self.block_size - 1):
            bad("block_size", f"must be a power of two, got {self.block_size}")
        integer("max_num_seqs", 1)
        integer("max_num_batched_tokens", 1)
        integer("max_model_len", 1, none_ok=True)
        integer("seed", 0)
        if not isinstance(self.enable_prefix_caching, bool):
            bad("enable_prefix_caching", f"must be True or False, got {self.enable_prefix_caching!r}")
        if self.device not in (None, "cuda", "cpu"):
            bad("device", f"{self.device!r}: expected 'cuda' or 'cpu'")
        if self.kv_cache_gib is not None and not (_num(self.kv_cache_gib) and self.kv_cache_gib > 0):
            bad("kv_cache_gib", f"must be a number > 0, got {self.kv_cache_gib!r}")
        if not (_num(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1):
            bad("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not (_num(self.max_step_ms) and self.max_step_ms >= 0):
            bad("max_step_ms", f"must be a number >= 0 (0: off), got {self.max_step_ms!r}")
        if not (_num(self.load_timeout_s) and self.load_timeout_s > 0):
            bad("load_timeout_s", f"must be a number > 0, got {self.load_timeout_s!r}")
        if self.attention is not None and self.attention not in ATTENTION_CHOICES:
            bad("attention", f"{self.attention!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
        if self.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            bad("logprobs_mode", f"{self.logprobs_mode!r}: expected raw_logprobs or processed_logprobs")
        if self.load_format not in LOAD_FORMATS:
            bad("load_format", f"{self.load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
        if self.layers is not None and self.layers != "auto":
            ok = isinstance(self.layers, (list, tuple)) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.layers)
            if not ok or not self.layers:
                bad("layers", f"must be a list of integers >= 1 (one per stage), None or 'auto', got {self.layers!r}")
            if len(self.layers) != self.stages:
                bad("layers", f"gives {len(self.layers)} stages but stages={self.stages}")
        if self.dtype is not None:
            from model.config import parse_dtype
            try:
                parse_dtype(self.dtype)
            except ValueError:
                bad("dtype", f"{self.dtype!r}: expected bfloat16, float16 or float32")
        return self

    def with_(self, **changes) -> "EngineOptions":
        return replace(self, **changes)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def options_from_kwargs(**kwargs) -> EngineOptions:
    """EngineOptions from LLM keyword arguments (unknown names raise TypeError), validated."""
    if isinstance(kwargs.get("layers"), tuple):
        kwargs["layers"] = list(kwargs["layers"])
    return EngineOptions(**kwargs).validate()


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """One flag per EngineOptions field (help and default shown); `defaults` overrides a default."""
    defaults = defaults or {}
    g = parser.add_argument_group("engine options")
    for f in fields(EngineOptions):
        if f.name in skip:
            continue
        m, default = f.metadata, defaults.get(f.name, f.default)
        if isinstance(default, bool) or (f.default is not MISSING and isinstance(f.default, bool)):
            action = "store_false" if default else "store_true"
            g.add_argument(flag_name(f), dest=f.name, action=action, default=default, help=m["help"])
            continue
        text = m["help"] if default is None and "default" in m["help"] else f"{m['help']} [default: {default}]"
        kw = {"type": m["type"], "default": default, "help": text}
        if m.get("choices"):
            kw["choices"] = m["choices"]
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        g.add_argument(flag_name(f), dest=f.name, **kw)


def options_from_args(a: argparse.Namespace, **overrides) -> EngineOptions:
    """EngineOptions from parsed flags (fields not on the parser keep their defaults), validated."""
    kw = {f.name: getattr(a, f.name) for f in fields(EngineOptions) if hasattr(a, f.name)}
    kw.update(overrides)
    return EngineOptions(**kw).validate()
