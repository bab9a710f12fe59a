"""The one table of Qwen3-MoE weight tensors: each Stage parameter's name, its shape from ModelConfig,
which stages and layers hold it, and the checkpoint tensors that fill it. The model (parameter
creation), the loader (names, strict shapes), the writer (random checkpoints) and `plan` (memory)
read it. Every weight has the model's one dtype (the engine's `dtype`, or config.json's
torch_dtype in a written checkpoint), so an entry holds no dtype of its own."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor that fills a row range of a parameter (of expert e's slice when the
    parameter is per expert). `rows` names a ModelConfig attribute."""
    name: str  # checkpoint name under the entry's checkpoint prefix; "{e}" stands for the expert index
    rows: str


@dataclass(frozen=True)
class TensorSpec:
    """A Stage parameter. Its pieces, stacked along dim 0, form it (per expert, under a leading
    [num_experts] dim: a checkpoint holds it per expert, or whole under `param` in the fused layout)."""
    param: str  # the Stage's name, under "layers.{i}." for a layer tensor
    pieces: tuple[Piece, ...]
    cols: tuple[str, ...] = ()  # trailing dims, ModelConfig attribute names, the same for every piece
    holds: str = "layer"  # who holds it: "layer" (every decoder layer), "moe", "dense", "embed", "head"
    experts: bool = False  # a leading [num_experts] dim
    norm: bool = False  # a norm weight: random checkpoints fill it with 1 + N(0, 0.1)

    def piece_shape(self, cfg: ModelConfig, piece: Piece) -> Shape:
        return (getattr(cfg, piece.rows), *(getattr(cfg, c) for c in self.cols))

    def shape(self, cfg: ModelConfig) -> Shape:
        rows = sum(getattr(cfg, p.rows) for p in self.pieces)
        return ((cfg.num_experts,) if self.experts else ()) + (rows, *(getattr(cfg, c) for c in self.cols))

    def in_layer(self, cfg: ModelConfig, i: int) -> bool:
        sparse = cfg.is_sparse(i)
        return {"layer": True, "moe": sparse, "dense": not sparse}.get(self.holds, False)


def _one(param: str, rows: str, *cols: str, holds: str = "layer", ckpt: str | None = None,
         norm: bool = False) -> TensorSpec:
    """A parameter stored whole, under its own name (or `ckpt`)."""
    return TensorSpec(param, (Piece(ckpt or param, rows),), cols, holds, norm=norm)


# In checkpoint order. Layer tensors: checkpoint names under "model.layers.{i}.", Stage names under
# "layers.{i}."; the others carry their whole checkpoint name.
LAYER_TENSORS = (
    _one("input_layernorm.weight", "hidden_size", norm=True),
    TensorSpec("self_attn.qkv_proj.weight",  # [q | k | v] rows: one GEMM per layer
               (Piece("self_attn.q_proj.weight", "q_size"), Piece("self_attn.k_proj.weight", "kv_size"),
                Piece("self_attn.v_proj.weight", "kv_size")), ("hidden_size",)),
    _one("self_attn.o_proj.weight", "hidden_size", "q_size"),
    _one("self_attn.q_norm.weight", "head_dim", norm=True),
    _one("self_attn.k_norm.weight", "head_dim", norm=True),
    _one("post_attention_layernorm.weight", "hidden_size", norm=True),
    _one("mlp.gate.weight", "num_experts", "hidden_size", holds="moe"),  # the router
    TensorSpec("mlp.experts.gate_up_proj",  # [E, 2I, H]: gate_e rows, then up_e rows
               (Piece("mlp.experts.{e}.gate_proj.weight", "moe_intermediate_size"),
                Piece("mlp.experts.{e}.up_proj.weight", "moe_intermediate_size")), ("hidden_size",),
               holds="moe", experts=True),
    TensorSpec("mlp.experts.down_proj", (Piece("mlp.experts.{e}.down_proj.weight", "hidden_size"),),
               ("moe_intermediate_size",), holds="moe", experts=True),  # [E, H, I]
    _one("mlp.gate_proj.weight", "intermediate_size", "hidden_size", holds="dense"),
    _one("mlp.up_proj.weight", "intermediate_size", "hidden_size", holds="dense"),
    _one("mlp.down_proj.weight", "hidden_size", "intermediate_size", holds="dense"),
)
EMBED = _one("embed_tokens.weight", "vocab_size", "hidden_size", holds="embed", ckpt="model.embed_tokens.weight")
FINAL_NORM = _one("norm.weight", "hidden_size", holds="head", ckpt="model.norm.weight", norm=True)
LM_HEAD = _one("lm_head.weight", "vocab_size", "hidden_size", holds="head")  # absent from a tied checkpoint
TENSORS = {t.param: t for t in (EMBED, *LAYER_TENSORS, FINAL_NORM, LM_HEAD)}


def param_shape(cfg: ModelConfig, param: str) -> Shape:
    """The shape of a Stage parameter named without its "layers.{i}." prefix."""
    return TENSORS[param].shape(cfg)


def spec_of(name: str) -> TensorSpec:
    """The entry of a Stage parameter named as named_parameters() names it ("layers.3.mlp.gate.weight")."""
    return TENSORS[name.split(".", 2)[2] if name.startswith("layers.") else name]


def layer_tensors(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    return [t for t in LAYER_TENSORS if t.in_layer(cfg, i)]


def stage_shapes(cfg: ModelConfig, start: int, end: int, has_embed: bool, has_head: bool) -> dict[str, Shape]:
    """Every parameter a Stage of layers [start, end) allocates, by its name in named_parameters()."""
    out = {EMBED.param: EMBED.shape(cfg)} if has_embed else {}
    for i in range(start, end):
        out |= {f"layers.{i}.{t.param}": t.shape(cfg) for t in layer_tensors(cfg, i)}
    if has_head:
        out |= {t.param: t.shape(cfg) for t in (FINAL_NORM, LM_HEAD)}
    return out


def layer_params(cfg: ModelConfig, i: int) -> tuple[int, int]:
    """(total, active per token) parameters of decoder layer i: a token reads k of the E experts."""
    total = active = 0
    for t in layer_tensors(cfg, i):
        n = math.prod(t.shape(cfg))
        total += n
        active += n // cfg.num_experts * cfg.num_experts_per_tok if t.experts else n
    return total, active
