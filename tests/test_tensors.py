"""The table of weight tensors (model/tensors.py) is the one truth: the Stage allocates exactly its
tensors, the writer stores exactly them, `plan` counts exactly them, and the loader's coverage is
theirs, for MoE, dense, mixed and tied configs."""
from __future__ import annotations

import math

import pytest
import torch

from engine.tools.plan import model_totals, stage_plan
from loader.names import checkpoint_layout, placements, required_parts
from loader.partition import partition
from loader.presets import preset_config
from loader.writer import plan_checkpoint, plan_tensors
from model.config import ModelConfig
from model.stage import Stage
from model.tensors import LAYER_TENSORS, TENSORS, layer_params, spec_of, stage_shapes

TINY = preset_config("tiny")
CONFIGS = {
    "moe": TINY,
    "mixed": dict(TINY, mlp_only_layers=[0, 2]),  # dense layers 0 and 2 beside MoE 1 and 3
    "step2": dict(TINY, decoder_sparse_step=2),
    "tied": dict(TINY, tie_word_embeddings=True),
    "dense": dict(TINY, num_experts=0),
}


def _splits(cfg: ModelConfig):
    return [s for n in (1, 2, 3) for s in partition(cfg.num_hidden_layers, n)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stage_allocates_exactly_the_table(name):
    cfg = ModelConfig.from_dict(CONFIGS[name])
    for s in _splits(cfg):
        stage = Stage(cfg, s.start, s.end, s.has_embed, s.has_head, "meta", torch.float32)
        got = {n: tuple(t.shape) for n, t in stage.state_dict().items()}
        assert got == stage_shapes(cfg, s.start, s.end, s.has_embed, s.has_head), (name, s)
        assert all(spec_of(n).shape(cfg) == shape for n, shape in got.items())


def test_table_shapes_by_hand():
    cfg = ModelConfig.from_dict(TINY)
    E, I, H, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.head_dim
    nh, nkv, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    by_hand = {"self_attn.qkv_proj.weight": ((nh + 2 * nkv) * D, H), "self_attn.o_proj.weight": (H, nh * D),
               "self_attn.q_norm.weight": (D,), "mlp.gate.weight": (E, H),
               "mlp.experts.gate_up_proj": (E, 2 * I, H), "mlp.experts.down_proj": (E, H, I),
               "mlp.down_proj.weight": (H, cfg.intermediate_size), "embed_tokens.weight": (V, H),
               "lm_head.weight": (V, H), "norm.weight": (H,)}
    assert {k: TENSORS[k].shape(cfg) for k in by_hand} == by_hand
    assert [t.param for t in LAYER_TENSORS if t.norm] == [
        "input_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        "post_attention_layernorm.weight"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_counts_what_the_writer_stores(name, dtype):
    config = CONFIGS[name]
    cfg = ModelConfig.from_dict(config)
    esz = torch.empty((), dtype=dtype).element_size()
    for fused in (False, True):
        ckpt = plan_checkpoint(config, dtype=dtype, fused_experts=fused, single_file=True)
        assert ckpt.total_size == model_totals(cfg)[0] * esz
        assert stage_plan(cfg, 1, 64, 80, dtype).weight_bytes == ckpt.total_size
    if not cfg.tie_word_embeddings:  # untied, the stages together hold each stored tensor once
        for stages in (2, 3):
            p = stage_plan(cfg, stages, 64, 80, dtype)
            assert sum(r.weight_bytes for r in p.per_stage) == ckpt.total_size
            for r, s in zip(p.per_stage, partition(cfg.num_hidden_layers, stages)):
                shapes = stage_shapes(cfg, s.start, s.end, s.has_embed, s.has_head)
                assert r.params == sum(math.prod(x) for x in shapes.values())


def test_active_params_read_k_of_e_experts():
    cfg = ModelConfig.from_dict(TINY)
    E, k, I, H = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hidden_size
    total, active = layer_params(cfg, 0)
    assert total - active == (E - k) * 3 * I * H
    dense = ModelConfig.from_dict(CONFIGS["dense"])
    assert layer_params(dense, 0)[0] == layer_params(dense, 0)[1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_both_layouts_fill_the_same_pieces(name):
    """Per-expert and fused checkpoints name every tensor the writer stores, and each layout's
    pieces are exactly what the whole model's stages need filled."""
    cfg = ModelConfig.from_dict(CONFIGS[name])
    need = required_parts(cfg, 0, cfg.num_hidden_layers, True, True)
    accepted = placements(cfg)
    for fused in (False, True):
        layout = checkpoint_layout(cfg, fused)
        pieces = [q for p in layout.values() for q in p.parts]
        assert len(pieces) == len(set(pieces)) and set(pieces) == need
        stored = [t.entry.name for t in plan_tensors(CONFIGS[name], torch.float32, fused)]
        assert stored == [n for n in layout if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
        assert all(accepted[n] == layout[n] for n in layout)
    moe_layers = sum(map(cfg.is_sparse, range(cfg.num_hidden_layers)))
    assert len(accepted) == len(checkpoint_layout(cfg)) + 2 * moe_layers  # + gate_up_proj, down_proj
