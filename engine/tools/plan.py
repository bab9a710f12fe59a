"""Will a model fit N cards of a given size, and how much KV cache (tokens, sequences) is left?
Per-stage weights, KV capacity and the verdict the `plan` command prints; also the memory model of
the automatic split. Pure arithmetic on config.json; no weights are read and no GPU is needed."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loader.partition import partition
from loader.presets import PRESETS, preset_config
from model.config import ModelConfig
from model.tensors import LM_HEAD, layer_params, stage_shapes

GIB = 2**30
RUNTIME_RESERVE_GIB = 2.0  # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation
PREFILL_CHUNK = 8192  # the engine's default max_num_batched_tokens: the largest forward it runs


@dataclass
class StagePlan:
    rank: int
    start: int
    end: int  # exclusive
    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_free_bytes: int  # card - weights - reserve; negative when the weights do not fit
    tokens: int  # KV tokens that fit (0 when none)
    sequences: int  # tokens // context


@dataclass
class Plan:
    model: str
    stages: int
    context: int
    gpu_memory_gib: float
    dtype: str
    reserve_gib: float
    total_params: int
    active_params: int
    weight_bytes: int  # whole model, unique parameters (a tied head counted once)
    kv_bytes_per_token: int  # whole model
    max_position_embeddings: int
    rope_type: str
    per_stage: list[StagePlan]
    tokens: int  # pipeline-wide: min over stages, since every stage holds KV for the same tokens
    sequences: int
    fits: bool  # weights + reserve fit every card and at least one sequence of `context` fits
    context_ok: bool  # context <= max_position_embeddings
    min_stages: int | None  # fewest stages of this card size that fit (None: not even one layer per card)
    verdict: list[str] = field(default_factory=list)


def outer_params(cfg: ModelConfig, has_embed: bool, has_head: bool) -> int:
    """Embedding, final norm and head parameters on one card. A tied head shares the embedding only
    when it lives on the same card; otherwise the last stage loads its own copy of the matrix."""
    shapes = stage_shapes(cfg, 0, 0, has_embed, has_head)
    if cfg.tie_word_embeddings and has_embed:
        shapes.pop(LM_HEAD.param, None)
    return sum(math.prod(s) for s in shapes.values())


def _activation_bytes_per_token(cfg: ModelConfig) -> int:
    """Rough peak of one forward, per token, all counted as fp32 to err high: residual, norm and
    attention temporaries (~8 H), q/k/v, and the MoE's k routed copies (gate_up + fp32 output)."""
    H = cfg.hidden_size
    mlp = max(cfg.num_experts_per_tok * (2 * cfg.moe_intermediate_size + H) if cfg.num_experts else 0,
              2 * cfg.intermediate_size)
    return 4 * (8 * H + cfg.q_size + 2 * cfg.kv_size + mlp)


def default_reserve_gib(cfg: ModelConfig, chunk: int = PREFILL_CHUNK) -> float:
    return RUNTIME_RESERVE_GIB + chunk * _activation_bytes_per_token(cfg) / GIB


def model_totals(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters; embeddings and head count as active (each token reads
    its embedding row and the full head), a tied head once."""
    layers = [layer_params(cfg, i) for i in range(cfg.num_hidden_layers)]
    outer = outer_params(cfg, True, True)
    return sum(t for t, _ in layers) + outer, sum(a for _, a in layers) + outer


def stage_plan(cfg: ModelConfig, stages: int, context: int, gpu_memory_gib: float,
               dtype: torch.dtype = torch.bfloat16, layer_counts: list[int] | None = None,
               reserve_gib: float | None = None, _search: bool = True) -> Plan:
    """Per-stage weights and KV capacity; reserve_gib=None uses default_reserve_gib(cfg)."""
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    if gpu_memory_gib <= 0:
        raise ValueError(f"gpu memory must be > 0 GiB, got {gpu_memory_gib}")
    esz = torch.empty((), dtype=dtype).element_size()
    reserve = default_reserve_gib(cfg) if reserve_gib is None else reserve_gib
    layer_totals = [layer_params(cfg, i)[0] for i in range(cfg.num_hidden_layers)]
    rows = []
    for s in partition(cfg.num_hidden_layers, stages, layer_counts):
        params = sum(layer_totals[s.start:s.end]) + outer_params(cfg, s.has_embed, s.has_head)
        kv = len(s.layers) * cfg.kv_bytes_per_token_per_layer(dtype)
        free = int(gpu_memory_gib * GIB) - params * esz - int(reserve * GIB)
        tokens = max(0, free) // kv
        rows.append(StagePlan(s.rank, s.start, s.end, params, params * esz, kv, free, tokens, tokens // context))
    total, active = model_totals(cfg)
    tokens = min(r.tokens for r in rows)
    p = Plan(model=cfg.source, stages=stages, context=context, gpu_memory_gib=gpu_memory_gib,
             dtype=str(dtype).removeprefix("torch."), reserve_gib=round(reserve, 3), total_params=total,
             active_params=active, weight_bytes=total * esz,
             kv_bytes_per_token=cfg.num_hidden_layers * cfg.kv_bytes_per_token_per_layer(dtype),
             max_position_embeddings=cfg.max_position_embeddings, rope_type=cfg.rope.rope_type, per_stage=rows, tokens=tokens,
             sequences=tokens // context, fits=tokens // context >= 1,
             context_ok=context <= cfg.max_position_embeddings, min_stages=None)
    if _search:  # even splits only; the first stage count at which one sequence of `context` fits
        p.min_stages = next((n for n in range(1, cfg.num_hidden_layers + 1)
                             if stage_plan(cfg, n, context, gpu_memory_gib, dtype, None, reserve, False).fits),
                            None)
    p.verdict = _verdict(p)
    return p


def _verdict(p: Plan) -> list[str]:
    card, out = p.gpu_memory_gib, []
    heavy = max(p.per_stage, key=lambda r: r.weight_bytes)
    worst = min(p.per_stage, key=lambda r: r.kv_free_bytes)
    if heavy.weight_bytes > card * GIB:
        out.append(f"does not fit: stage {heavy.rank} needs {heavy.weight_bytes / GIB:.1f} GiB of weights, "
                   f"the card has {card:g} GiB (whole model: {p.weight_bytes / GIB:.1f} GiB = "
                   f"{p.weight_bytes / 1e9:.1f} GB in {p.dtype})")
    elif worst.kv_free_bytes < 0:
        out.append(f"does not fit: stage {worst.rank} needs {worst.weight_bytes / GIB:.1f} GiB of weights "
                   f"+ {p.reserve_gib:.1f} GiB reserve, the card has {card:g} GiB")
    elif not p.context_ok:  # the weights fit; "fits" would contradict the line below
        out.append(f"the weights fit, but not a context of {p.context} tokens:")
    elif not p.fits:
        lim = min(p.per_stage, key=lambda r: r.tokens)
        out.append(f"fits, but a context of {p.context} tokens does not: KV holds only {p.tokens} tokens "
                   f"(stage {lim.rank} has {lim.kv_free_bytes / GIB:.2f} GiB free)")
    else:
        out.append(f"fits: KV for {p.tokens} tokens = {p.sequences} sequences of {p.context} tokens")
    if not p.context_ok:
        out.append(f"a context of {p.context} tokens exceeds the model's max_position_embeddings "
                   f"{p.max_position_embeddings}: the engine will not run sequences that long"
                   + (" (YaRN rope_scaling in config.json extends it)" if p.rope_type == "default" else ""))
    if p.min_stages is None:
        out.append(f"no split into up to {p.per_stage[-1].end} stages of {card:g} GiB "
                   f"fits a {p.context}-token sequence")
    elif p.context_ok and (not p.fits or p.min_stages < p.stages):
        n = p.min_stages
        out.append(f"minimum: {n} card{'s' if n > 1 else ''} of {card:g} GiB (even split) to hold the weights "
                   f"and one {p.context}-token sequence")
    return out


def format_plan(p: Plan) -> str:
    lines = [f"model: {p.model}",
             f"params: {p.total_params / 1e9:.2f} B total, {p.active_params / 1e9:.2f} B active per token; "
             f"weights {p.weight_bytes / GIB:.1f} GiB ({p.weight_bytes / 1e9:.1f} GB) in {p.dtype}",
             f"KV cache: {p.kv_bytes_per_token / 1024:.1f} KiB per token for the whole model",
             f"card: {p.gpu_memory_gib:g} GiB per stage; reserve {p.reserve_gib:.2f} GiB per stage "
             f"({RUNTIME_RESERVE_GIB:g} GiB runtime + activations of {PREFILL_CHUNK}-token prefill chunks)",
             "",
             f"{'stage':>5} {'layers':>9} {'weights GiB':>12} {'KV KiB/tok':>11} {'KV GiB free':>12} "
             f"{'tokens':>10} {'seqs of ' + str(p.context):>15}"]
    for r in p.per_stage:
        lines.append(f"{r.rank:>5} {f'{r.start}-{r.end - 1}':>9} {r.weight_bytes / GIB:>12.2f} "
                     f"{r.kv_bytes_per_token / 1024:>11.1f} {r.kv_free_bytes / GIB:>12.2f} "
                     f"{r.tokens:>10} {r.sequences:>15}")
    lines.append(f"{'all':>5} {'':>9} {sum(r.weight_bytes for r in p.per_stage) / GIB:>12.2f} "
                 f"{p.kv_bytes_per_token / 1024:>11.1f} {'':>12} {p.tokens:>10} {p.sequences:>15}")
    return "\n".join(lines + [""] + p.verdict)


def resolve_model(spec: str) -> ModelConfig:
    """--model: a directory holding config.json, a config.json file, or a preset name."""
    path = Path(spec)
    if path.is_dir() or path.is_file():
        return ModelConfig.from_file(path, lenient=True)  # ConfigError (a ValueError) names file and key
    if spec in PRESETS:
        return ModelConfig.from_dict(preset_config(spec), source=f"preset {spec}")
    raise ValueError(f"--model {spec}: no such directory or file, and not a preset "
                     f"({', '.join(sorted(PRESETS))})")


def _default_gpu_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return 80.0
