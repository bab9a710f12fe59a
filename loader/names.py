"""Checkpoint tensor names -> Stage parameters, read off the table in model/tensors.py. Per-expert
(`mlp.experts.E.gate_proj.weight`) and fused (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]) layouts both map onto the Stage's fused expert tensors; q_proj,
k_proj and v_proj fill row ranges of the Stage's `self_attn.qkv_proj.weight` [q_size + 2 * kv_size, H]."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from model.config import ModelConfig
from model.tensors import EMBED, FINAL_NORM, LM_HEAD, Shape, TensorSpec, layer_tensors


class Part(NamedTuple):
    """One piece of a parameter, named as the per-expert checkpoint layout names it."""
    name: str
    shape: Shape
    fused: str | None = None  # the fused-layout tensor that holds it instead

    def describe(self) -> str:
        return self.name + (f" (or fused {self.fused})" if self.fused else "")


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor goes: param[index] = tensor (index () = whole parameter)."""
    param: str
    index: tuple
    shape: Shape  # the shape the checkpoint tensor must have
    layer: int | None  # None for embed / norm / head
    parts: tuple[Part, ...]  # the parameter pieces it fills, in storage order (to check full coverage)
    norm: bool = False  # a norm weight (random checkpoints fill it with 1 + N(0, 0.1))


def _parts(spec: TensorSpec, cfg: ModelConfig, layer: int | None) -> list[list[Part]]:
    """The entry's pieces [expert][piece] as the per-expert layout names them (one row, for expert
    None, when the entry is not per expert)."""
    ck = f"model.layers.{layer}." if layer is not None else ""
    fused = ck + spec.param if spec.experts else None
    shapes = [(p.name, spec.piece_shape(cfg, p)) for p in spec.pieces]
    experts = range(cfg.num_experts) if spec.experts else (None,)
    return [[Part(ck + name.format(e=e), shape, fused) for name, shape in shapes] for e in experts]


def _param(spec: TensorSpec, layer: int | None) -> str:
    return spec.param if layer is None else f"layers.{layer}.{spec.param}"


def _split(spec: TensorSpec, layer: int | None, parts: list[Part], expert: int | None) -> dict[str, Placement]:
    """One checkpoint tensor per piece (of one expert's slice when per expert), each a row range."""
    out, row, param = {}, 0, _param(spec, layer)
    for q in parts:
        rows, row = slice(row, row + q.shape[0]), row + q.shape[0]
        index = ((expert,) if spec.experts else ()) + ((rows,) if len(parts) > 1 else ())
        out[q.name] = Placement(param, index, q.shape, layer, (q,), spec.norm)
    return out


def _outer(spec: TensorSpec, cfg: ModelConfig) -> dict[str, Placement]:
    return _split(spec, None, _parts(spec, cfg, None)[0], None)


def _layer_layout(cfg: ModelConfig, i: int, per_expert: bool = True, fused: bool = False
                 ) -> dict[str, Placement]:
    """Layer i's checkpoint tensors in storage order, with its expert tensors per expert (gate, up,
    down of expert 0, then of expert 1, ...) and/or fused, after the layer's other tensors."""
    specs = layer_tensors(cfg, i)
    parts = {spec.param: _parts(spec, cfg, i) for spec in specs}
    out: dict[str, Placement] = {}
    for spec in specs:
        if not spec.experts:
            out |= _split(spec, i, parts[spec.param][0], None)
        elif fused:
            every = tuple(q for row in parts[spec.param] for q in row)
            out[every[0].fused] = Placement(_param(spec, i), (), spec.shape(cfg), i, every, spec.norm)
    for e in range(cfg.num_experts if per_expert else 0):
        for spec in (s for s in specs if s.experts):
            out |= _split(spec, i, parts[spec.param][e], e)
    return out


def checkpoint_layout(cfg: ModelConfig, fused_experts: bool = False) -> dict[str, Placement]:
    """Every tensor a checkpoint of this config holds, in storage order: embed, layers 0..L-1,
    norm, lm_head (a tied checkpoint may leave lm_head out)."""
    return _layout(cfg, not fused_experts, fused_experts)


def placements(cfg: ModelConfig) -> dict[str, Placement]:
    """Every checkpoint name this config accepts, per-expert and fused, with its placement."""
    return _layout(cfg, True, True)


def _layout(cfg: ModelConfig, per_expert: bool, fused: bool) -> dict[str, Placement]:
    out = _outer(EMBED, cfg)
    for i in range(cfg.num_hidden_layers):
        out |= _layer_layout(cfg, i, per_expert, fused)
    return out | _outer(FINAL_NORM, cfg) | _outer(LM_HEAD, cfg)


def required_parts(cfg: ModelConfig, start: int, end: int, has_embed: bool, has_head: bool) -> set[Part]:
    """Every parameter piece a stage needs filled (the coverage a correct load must reach)."""
    outer = ([EMBED] if has_embed else []) + ([FINAL_NORM, LM_HEAD] if has_head else [])
    pieces = [_parts(spec, cfg, None) for spec in outer]
    pieces += [_parts(spec, cfg, i) for i in range(start, end) for spec in layer_tensors(cfg, i)]
    return {q for rows in pieces for row in rows for q in row}
