"""Checkpoint tensor names -> Stage parameters. Per-expert (`mlp.experts.E.gate_proj.weight`) and
fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) layouts both map
onto the Stage's fused expert tensors; q_proj, k_proj and v_proj fill row ranges of the Stage's
`self_attn.qkv_proj.weight` [q_size + 2 * kv_size, H] (one GEMM per layer)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from model.config import ModelConfig

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_QKV = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v"}
QKV_PARAM = "self_attn.qkv_proj.weight"
_ATTN = ("self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
         "input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor goes: param[index] = tensor (index () = whole parameter)."""
    param: str
    index: tuple
    shape: tuple[int, ...]  # the shape the checkpoint tensor must have
    layer: int | None  # None for embed / norm / head
    parts: frozenset  # keys of the parameter pieces it fills, to check full coverage


def _whole(param: str, shape: tuple, layer: int | None) -> Placement:
    return Placement(param, (), shape, layer, frozenset({(param,)}))


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, D = cfg.hidden_size, cfg.head_dim
    return {"self_attn.q_proj.weight": (cfg.q_size, H), "self_attn.k_proj.weight": (cfg.kv_size, H),
            "self_attn.v_proj.weight": (cfg.kv_size, H), "self_attn.o_proj.weight": (H, cfg.q_size),
            "self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,),
            "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}


def place(name: str, cfg: ModelConfig) -> Placement | None:
    """The placement of a checkpoint tensor, or None when the name is not part of this model."""
    H, V = cfg.hidden_size, cfg.vocab_size
    if name == "model.embed_tokens.weight":
        return _whole("embed_tokens.weight", (V, H), None)
    if name == "lm_head.weight":
        return _whole("lm_head.weight", (V, H), None)
    if name == "model.norm.weight":
        return _whole("norm.weight", (H,), None)
    m = _LAYER.fullmatch(name)
    if not m or int(m.group(1)) >= cfg.num_hidden_layers:
        return None
    i, rest = int(m.group(1)), m.group(2)
    pre = f"layers.{i}."
    if rest in _ATTN:
        return _whole(pre + rest, _layer_shapes(cfg)[rest], i)
    if rest in _QKV:
        which, q, kv = _QKV[rest], cfg.q_size, cfg.kv_size
        rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[which]
        qkv = pre + QKV_PARAM
        return Placement(qkv, (rows,), _layer_shapes(cfg)[rest], i, frozenset({(qkv, which)}))
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    if cfg.is_sparse(i):
        gu, dn = pre + "mlp.experts.gate_up_proj", pre + "mlp.experts.down_proj"
        if rest == "mlp.gate.weight":
            return _whole(pre + rest, (E, H), i)
        if rest == "mlp.experts.gate_up_proj":
            return Placement(gu, (), (E, 2 * I, H), i, frozenset((gu, e, p) for e in range(E) for p in ("gate", "up")))
        if rest == "mlp.experts.down_proj":
            return Placement(dn, (), (E, H, I), i, frozenset((dn, e) for e in range(E)))
        em = _EXPERT.fullmatch(rest)
        if em and int(em.group(1)) < E:
            e, kind = int(em.group(1)), em.group(2)
            if kind == "down":
                return Placement(dn, (e,), (H, I), i, frozenset({(dn, e)}))
            rows = slice(0, I) if kind == "gate" else slice(I, 2 * I)
            return Placement(gu, (e, rows), (I, H), i, frozenset({(gu, e, kind)}))
        return None
    Id = cfg.intermediate_size
    dense = {"mlp.gate_proj.weight": (Id, H), "mlp.up_proj.weight": (Id, H), "mlp.down_proj.weight": (H, Id)}
    return _whole(pre + rest, dense[rest], i) if rest in dense else None


def required_parts(cfg: ModelConfig, start: int, end: int, has_embed: bool, has_head: bool) -> set:
    """Every parameter piece a stage needs filled (the coverage a correct load must reach)."""
    parts: set = set()
    if has_embed:
        parts.add(("embed_tokens.weight",))
    if has_head:
        parts |= {("norm.weight",), ("lm_head.weight",)}
    for i in range(start, end):
        pre = f"layers.{i}."
        parts |= {(pre + n,) for n in _ATTN}
        parts |= {(pre + QKV_PARAM, w) for w in _QKV.values()}
        if cfg.is_sparse(i):
            parts.add((pre + "mlp.gate.weight",))
            parts |= {(pre + "mlp.experts.gate_up_proj", e, p) for e in range(cfg.num_experts) for p in ("gate", "up")}
            parts |= {(pre + "mlp.experts.down_proj", e) for e in range(cfg.num_experts)}
        else:
            parts |= {(pre + f"mlp.{n}_proj.weight",) for n in ("gate", "up", "down")}
    return parts
