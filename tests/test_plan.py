"""`plan` arithmetic checked against hand computations; CPU only, no weights."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from engine.cli.plan import GIB, add_parser, default_reserve_gib, resolve_model, run_plan, stage_plan
from loader.presets import preset_config
from model.config import ModelConfig

# A copy of ../shared/docs/user-config.json, so the test does not depend on that checkout.
USER_CONFIG = {
    "num_hidden_layers": 48, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_size": 6144, "intermediate_size": 8192, "num_experts": 128, "num_experts_per_tok": 16,
    "moe_intermediate_size": 1024, "max_position_embeddings": 131072,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "rope_theta": 2000000.0, "torch_dtype": "bfloat16", "use_cache": True, "attention_dropout": 0.01,
    "output_router_logits": True,
}
VOCAB = 151936  # lenient default when vocab_size is absent


def _cli(argv: list[str]) -> int:
    """The real entry point when the lead's main is wired, else a parser built from add_parser."""
    try:
        from engine.__main__ import main
        return main(argv)
    except ImportError:
        ap = argparse.ArgumentParser()
        add_parser(ap.add_subparsers(dest="command", required=True))
        a = ap.parse_args(argv)
        return a.run(a)


def _layer(H: int, q: int, kv: int, D: int, E: int, I: int) -> int:
    """Hand count of one MoE layer: q,k,v,o + q/k norms + 2 layer norms + router + E experts."""
    return 2 * q * H + 2 * kv * H + 2 * D + 2 * H + E * H + E * 3 * I * H


@pytest.fixture
def user_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(USER_CONFIG))
    return path


def test_30b_on_two_80gib_cards():
    cfg = ModelConfig.from_dict(preset_config("qwen3-30b-a3b"))
    p = stage_plan(cfg, 2, 32768, 80, torch.bfloat16, reserve_gib=4.0)
    assert p.fits and p.context_ok and p.verdict[0].startswith("fits")
    assert abs(p.total_params / 30.5e9 - 1) < 0.01 and abs(p.active_params / 3.3e9 - 1) < 0.03
    # per-stage weights add up to the whole model (~61 GB), untied so no duplicated matrix
    assert sum(r.weight_bytes for r in p.per_stage) == p.weight_bytes
    assert abs(p.weight_bytes / 61e9 - 1) < 0.01
    assert p.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2 == 96 * 1024
    # hand computation: 24 layers per stage; embed on stage 0, final norm + lm_head on stage 1
    layer = _layer(2048, 4096, 512, 128, 128, 768)
    w0 = (24 * layer + VOCAB * 2048) * 2
    w1 = (24 * layer + VOCAB * 2048 + 2048) * 2
    assert [r.weight_bytes for r in p.per_stage] == [w0, w1]
    kv_stage = 24 * 2 * 4 * 128 * 2
    tokens = min((80 * GIB - w - 4 * GIB) // kv_stage for w in (w0, w1))
    assert p.tokens == tokens and p.sequences == tokens // 32768
    assert p.min_stages == 1  # 57 GiB of weights fit one 80 GiB card too


def test_235b_totals():
    cfg = ModelConfig.from_dict(preset_config("qwen3-235b-a22b"))
    p = stage_plan(cfg, 8, 32768, 80)
    assert abs(p.total_params / 235e9 - 1) < 0.01 and abs(p.active_params / 22e9 - 1) < 0.02


def test_user_config_does_not_fit_two_96gib_cards(user_cfg: Path, capsys):
    cfg = resolve_model(str(user_cfg))
    p = stage_plan(cfg, 2, 32768, 96)
    layer = _layer(6144, 6144, 1024, 128, 128, 1024)
    heavy2 = (24 * layer + VOCAB * 6144 + 6144) * 2  # last stage: layers + lm_head + final norm
    assert heavy2 / GIB > 96 and abs(p.total_params / 120e9 - 1) < 0.03
    assert not p.fits and max(r.weight_bytes for r in p.per_stage) == heavy2
    assert p.verdict[0] == (f"does not fit: stage 1 needs {heavy2 / GIB:.1f} GiB of weights, the card has 96 GiB "
                            f"(whole model: {p.weight_bytes / GIB:.1f} GiB = {p.weight_bytes / 1e9:.1f} GB in bfloat16)")
    # three cards: 16 layers each; the heaviest stage plus reserve and one 32k sequence fits 96 GiB
    heavy3 = (16 * layer + VOCAB * 6144 + 6144) * 2
    assert heavy3 + default_reserve_gib(cfg) * GIB + 32768 * 16 * 2 * 1024 * 2 < 96 * GIB
    assert p.min_stages == 3 and "minimum: 3 cards of 96 GiB" in p.verdict[-1]

    assert _cli(["plan", "--model", str(user_cfg), "--stages", "2", "--gpu-memory", "96"]) == 2
    out = capsys.readouterr().out
    assert "does not fit: stage 1 needs 113.7 GiB of weights, the card has 96 GiB" in out
    assert out.count("\n    ") >= 2  # the table is still printed, one row per stage


def test_zero_sequences_fit():
    cfg = ModelConfig.from_dict(preset_config("qwen3-30b-a3b"))
    p = stage_plan(cfg, 2, 40000, 32, reserve_gib=2.0)  # 28.4 GiB weights, ~1.6 GiB left: ~34k tokens
    assert not p.fits and 0 < p.tokens < 40000
    assert p.verdict[0].startswith(f"fits, but a context of 40000 tokens does not: KV holds only {p.tokens} tokens")


def test_context_beyond_max_positions(capsys):
    cfg = ModelConfig.from_dict(preset_config("qwen3-30b-a3b"))
    p = stage_plan(cfg, 2, 65536, 80)
    assert p.fits and not p.context_ok
    assert any("exceeds the model's max_position_embeddings 40960" in v for v in p.verdict)
    assert _cli(["plan", "--model", "qwen3-30b-a3b", "--context", "65536", "--gpu-memory", "80"]) == 2
    assert "max_position_embeddings 40960" in capsys.readouterr().out
    # never "fits" and then "exceeds": the first verdict says the context is too long
    assert _cli(["plan", "--model", "qwen3-30b-a3b", "--context", "90000"]) == 2
    out = capsys.readouterr().out
    assert "fits:" not in out and "but not a context of 90000 tokens" in out and "minimum" not in out
    assert "exceeds the model's max_position_embeddings 40960" in out


def test_tied_embeddings_counted_on_last_stage():
    d = preset_config("tiny")
    d["tie_word_embeddings"] = True
    cfg = ModelConfig.from_dict(d)
    vh = cfg.vocab_size * cfg.hidden_size
    one = stage_plan(cfg, 1, 128, 1, torch.float32)
    two = stage_plan(cfg, 2, 128, 1, torch.float32)
    assert one.per_stage[0].params == one.total_params  # shared matrix counted once on one card
    assert sum(r.params for r in two.per_stage) == two.total_params + vh  # the last stage has its own copy
    assert two.per_stage[1].params - two.per_stage[0].params == cfg.hidden_size  # head copy + final norm vs embed
    untied = stage_plan(ModelConfig.from_dict(preset_config("tiny")), 2, 128, 1, torch.float32)
    assert untied.per_stage == two.per_stage and untied.total_params == two.total_params + vh


def test_layer_split_and_json(capsys):
    assert _cli(["plan", "--model", "qwen3-30b-a3b", "--gpu-memory", "80", "--layers", "25,23", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(r["start"], r["end"]) for r in d["per_stage"]] == [(0, 25), (25, 48)]
    assert d["kv_bytes_per_token"] == 98304 and d["fits"] and d["tokens"] == min(r["tokens"] for r in d["per_stage"])


def test_bad_input(tmp_path: Path, capsys):
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ValueError, match=str(missing)):
        resolve_model(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in USER_CONFIG.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match=r"bad\.json.*'hidden_size'"):
        resolve_model(str(bad))
    with pytest.raises(ValueError, match=r"config\.json not found"):
        resolve_model(str(tmp_path))  # a directory without config.json
    assert _cli(["plan", "--model", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
