"""Load one stage's tensors straight from the safetensors shards onto its device: only the shards
holding its tensors are opened, and host memory holds one tensor at a time."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.stage import Stage

from .checkpoint import CheckpointError, CheckpointIndex
from .names import Part, Placement, placements, required_parts
from .partition import StageSpec

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1}


def stage_placements(index: CheckpointIndex, cfg: ModelConfig, spec: StageSpec,
                     check_shapes: bool = True) -> list[tuple[str, Placement]]:
    """(checkpoint name, placement) for every tensor this stage loads; strict about the rest.
    check_shapes reads the shards' headers (False: names only, before the shards are fetched)."""
    chosen: list[tuple[str, Placement]] = []
    covered: dict[Part, str] = {}
    accepted = placements(cfg)
    for name in index.names:
        p = accepted.get(name)
        if p is None:
            raise CheckpointError(f"{index.weight_map[name]}: unexpected tensor {name!r}: not part of this "
                                  f"model ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts, "
                                  f"config {cfg.source})")
        if cfg.tie_word_embeddings and p.param == "lm_head.weight":
            continue  # tied: the head is the embedding
        targets = []
        if p.layer is not None:
            if spec.start <= p.layer < spec.end:
                targets.append(p)
        elif p.param == "embed_tokens.weight":
            if spec.has_embed:
                targets.append(p)
            if cfg.tie_word_embeddings and spec.has_head:
                targets.append(Placement("lm_head.weight", (), p.shape, None, (Part("lm_head.weight", p.shape),)))
        elif spec.has_head:
            targets.append(p)
        for t in targets:
            for part in t.parts:
                if part in covered:
                    raise CheckpointError(f"{index.folder}: tensor {name!r} fills {part.describe()}, already "
                                          f"filled by {covered[part]!r}")
                covered[part] = name
            chosen.append((name, t))
    missing = required_parts(cfg, spec.start, spec.end, spec.has_embed, spec.has_head) - covered.keys()
    if missing:
        shown = sorted(m.describe() for m in missing)
        raise CheckpointError(f"{index.folder}: missing tensor {shown[0]}"
                              + (f" and {len(shown) - 1} more" if len(shown) > 1 else "")
                              + f" (needed by stage {spec.rank}, layers {spec.start}..{spec.end - 1})")
    for name, p in chosen if check_shapes else ():
        info = index.info(name)
        if info.shape != p.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(p.shape)} for config {cfg.source}")
    return chosen


LOAD_FORMATS = ("auto", "dummy")


def load_stage(folder: str | Path, cfg: ModelConfig, spec: StageSpec, device: torch.device | str,
               dtype: torch.dtype, attention: str | None = None,
               log: Callable[[str], None] | None = None, load_format: str = "auto", seed: int = 0) -> Stage:
    """The stage's weights from the safetensors in `folder` ("auto", strict), or seeded random
    values made on `device` ("dummy": folder is not read; cfg may come from loader.dummy.dummy_config)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        from .dummy import dummy_stage
        t0 = time.perf_counter()
        stage = dummy_stage(cfg, spec, device, dtype, attention, seed)
        if log:
            n = sum(p.numel() * p.element_size() for p in stage.parameters())
            log(f"stage {spec.rank}: dummy weights, {_size(n)} in {time.perf_counter() - t0:.1f} s")
        return stage
    index = CheckpointIndex(folder)
    chosen = stage_placements(index, cfg, spec)
    stage = Stage(cfg, spec.start, spec.end, spec.has_embed, spec.has_head, device, dtype, attention)
    params = dict(stage.named_parameters())
    total = sum(_nbytes(index, n) for n, _ in chosen)
    done, t0, last = 0, time.perf_counter(), 0.0
    by_file: dict[Path, list] = {}
    for name, p in chosen:
        by_file.setdefault(index.weight_map[name], []).append((name, p))
    with torch.no_grad():
        for file, items in by_file.items():
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{file}: cannot open shard ({e})") from None
            with handle as f:
                for name, p in items:
                    params[p.param][p.index].copy_(f.get_tensor(name), non_blocking=False)
                    done += _nbytes(index, name)
                    now = time.perf_counter() - t0
                    if log and (now - last > 5 or done == total):
                        last = now
                        log(f"stage {spec.rank}: loaded {_size(done)} of {_size(total)} in {now:.1f} s")
    return stage


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _nbytes(index: CheckpointIndex, name: str) -> int:
    info = index.info(name)
    n = _BYTES.get(info.dtype, 2)
    for s in info.shape:
        n *= s
    return n
