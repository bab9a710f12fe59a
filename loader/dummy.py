"""load_format="dummy": a stage's weights filled with seeded random values on its own device, from a
config alone (a config.json path, a folder holding one, or a preset name of loader/presets.py).
No files are read or written, so a benchmark of the 61 GB shape starts in seconds. Values follow
the writer's init (matrices N(0, 0.02), norm weights 1 + N(0, 0.1)), so activations stay sane;
they are not the values write_checkpoint stores."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from model.config import ModelConfig
from model.stage import Stage
from model.tensors import spec_of

from .partition import StageSpec
from .presets import PRESETS, preset_config

STD = 0.02  # loader/writer.py's default


def dummy_config(source: str | Path) -> ModelConfig:
    """The ModelConfig of a preset name or a config.json (file or folder)."""
    if str(source) in PRESETS:
        return ModelConfig.from_dict(preset_config(str(source)), source=f"preset {source}")
    return ModelConfig.from_file(source, lenient=True)  # a hand-written config (no model_type, vocab) too


def _seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fill_dummy(stage: Stage, seed: int = 0) -> Stage:
    """Fill every parameter in place on its device; each from its own generator, so a parameter's
    values depend only on (seed, its name), not on the stage split."""
    gen = torch.Generator(device=stage.device)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            gen.manual_seed(_seed(seed, name))
            if spec_of(name).norm:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, STD, generator=gen)
    if stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)
    return stage


def dummy_stage(cfg: ModelConfig, spec: StageSpec, device: torch.device | str, dtype: torch.dtype,
                attention: str | None = None, seed: int = 0) -> Stage:
    stage = Stage(cfg, spec.start, spec.end, spec.has_embed, spec.has_head, device, dtype, attention)
    return fill_dummy(stage, seed)
