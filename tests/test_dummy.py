"""load_format="dummy": seeded random weights from a config alone, no files."""
import json

import pytest
import torch

from loader.dummy import dummy_config
from loader.load import load_stage
from loader.partition import partition
from loader.presets import preset_config
from model.batch import AttnBatch


def _stage(cfg, spec, seed=0, dtype=torch.float32):
    return load_stage("/nonexistent/folder", cfg, spec, "cpu", dtype, load_format="dummy", seed=seed)


def test_dummy_from_preset_and_config_json_agree(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_config("user-mini")))
    a, b = dummy_config("user-mini"), dummy_config(tmp_path)
    spec = partition(a.num_hidden_layers, 1)[0]
    pa, pb = dict(_stage(a, spec).named_parameters()), dict(_stage(b, spec).named_parameters())
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_dummy_values_seeded_and_independent_of_split():
    cfg = dummy_config("tiny")
    whole = dict(_stage(cfg, partition(cfg.num_hidden_layers, 1)[0]).named_parameters())
    last = dict(_stage(cfg, partition(cfg.num_hidden_layers, 2)[1]).named_parameters())
    assert "embed_tokens.weight" not in last and "lm_head.weight" in last
    assert all(torch.equal(whole[n], p) for n, p in last.items())
    other = dict(_stage(cfg, partition(cfg.num_hidden_layers, 1)[0], seed=1).named_parameters())
    assert not torch.equal(whole["layers.0.mlp.experts.down_proj"], other["layers.0.mlp.experts.down_proj"])
    w = whole["layers.1.mlp.experts.gate_up_proj"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    n = whole["layers.1.input_layernorm.weight"]
    assert abs(n.mean().item() - 1.0) < 0.05 and 0.05 < n.std().item() < 0.2
    qkv = whole["layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dummy_stage_runs_a_forward_with_seeded_logits(dtype):
    """Finite logits that the seed alone decides: the same seed gives the same logits, bit for bit,
    another seed others."""
    cfg = dummy_config("tiny")
    spec = partition(cfg.num_hidden_layers, 1)[0]
    ids = torch.randint(0, cfg.vocab_size, (20,))

    def logits(seed):
        stage = _stage(cfg, spec, seed=seed, dtype=dtype)
        stage.allocate_kv(4, 16)
        return stage(ids, AttnBatch.build([20], [20], [[2, 0]], 16, [True], "cpu"))

    a = logits(0)
    assert a.shape == (1, cfg.vocab_size) and torch.isfinite(a).all()
    assert torch.equal(a, logits(0)) and not torch.equal(a, logits(1))


def test_dummy_bad_inputs_are_named():
    with pytest.raises(ValueError, match="load_format 'dumy'"):
        load_stage("x", dummy_config("tiny"), partition(4, 1)[0], "cpu", torch.float32, load_format="dumy")
    with pytest.raises(Exception, match="config.json not found"):
        dummy_config("/nonexistent/preset-or-folder")


def test_precompile_covers_both_moe_paths_and_leaves_results_unchanged():
    from model.warmup import precompile, warm_shapes
    shapes = warm_shapes(40, 20, 64, small_max=16)
    tokens = {sum(q) for q, _ in shapes}
    assert {1, 16, 17, 40}.issubset(tokens) and any(len(q) == 20 for q, _ in shapes)
    assert any(c[0] > q[0] > 1 for q, c in shapes)  # a chunk behind cached tokens
    assert {2, 16, 17}.issubset({len(q) for q, _ in shapes if q[0] > 1})  # several prompts at once
    cfg = dummy_config("tiny")
    stage = _stage(cfg, partition(cfg.num_hidden_layers, 1)[0])
    stage.allocate_kv(8, 16)
    ids = torch.randint(0, cfg.vocab_size, (20,))
    batch = AttnBatch.build([20], [20], [[3, 5]], 16, [True], "cpu")
    before = stage(ids, batch)
    precompile(stage, 6, 2, 32)
    assert torch.equal(stage(ids, batch), before)
