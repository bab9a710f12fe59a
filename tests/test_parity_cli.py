"""`python -m engine parity`: the report on the tiny preset and on a transformers-saved checkpoint of
a config no preset has, a deliberately broken rope caught and named, and a missing transformers."""
import argparse
import json
import sys

import pytest

from hf_ref import hf_config, save_hf_model

# GQA 6:1 with head_dim != hidden/heads, a dense layer among MoE ones, tied embeddings, YaRN, no
# top-k renormalisation, saved in transformers' fused expert layout.
UNSEEN = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, head_dim=16, num_hidden_layers=4,
              mlp_only_layers=[2], tie_word_embeddings=True, norm_topk_prob=False, num_experts=6,
              num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=512,
              rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})


def _cli(argv: list[str]) -> int:
    """engine's main when the command is registered there, else the same parse-run-report path."""
    from engine import __main__ as entry
    if "parity" in getattr(entry, "COMMANDS", ()):
        return entry.main(argv)
    from engine.cli.parity import add_parser
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command", required=True))
    try:
        a = ap.parse_args(argv)
        return a.run(a)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    return save_hf_model(hf_config(**UNSEEN), tmp_path_factory.mktemp("unseen"), seed=11, fused=True)


def test_tiny_preset_passes(capsys):
    assert _cli(["parity", "--device", "cpu", "--prompt", "The quick brown fox jumps over the lazy dog"]) == 0
    out = capsys.readouterr().out
    for label in ("embedding", "input norm", "q after norm", "k after rope", "attention output", "router logits",
                  "top-k expert ids", "MoE output", "layer output", "final norm", "logits"):
        assert label in out, label
    assert " tokens, layers 0,1,2,3;" in out and out.rstrip().endswith("rows pass") and "FAIL" not in out


def test_unseen_config_chosen_layers_json(unseen, capsys):
    """Layers 1 and 2 only: transformers gets a two-layer model of exactly those tensors."""
    assert _cli(["parity", "--model", str(unseen), "--device", "cpu", "--layers", "1,2", "--tokens", "30",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["passed"] and d["first_failure"] is None and d["layers"] == [1, 2] and d["tokens"] == 30
    rows = {(r["layer"], r["key"]): r for r in d["rows"]}
    assert {la for la, _ in rows} == {None, 1, 2}
    assert (1, "topk_ids") in rows and (2, "topk_ids") not in rows  # layer 2 is dense (mlp_only_layers)
    assert rows[(2, "mlp_out")]["label"] == "MLP output" and rows[(1, "mlp_out")]["label"] == "MoE output"
    assert all(r["passed"] and (r["max_rel"] is None or r["max_rel"] <= r["bound"]) for r in d["rows"])


def test_broken_rope_fails_and_names_the_sublayer(unseen, monkeypatch, capsys):
    import model.layers
    monkeypatch.setattr(model.layers, "apply_rope", lambda x, cos, sin: x * cos[:, None, :])  # no rotation
    assert _cli(["parity", "--model", str(unseen), "--device", "cpu", "--layers", "0,3", "--tokens", "20"]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].endswith("first failing sub-layer: layer 0 q after rope (q_rope)")
    row = next(line for line in out.splitlines() if "q after rope" in line)
    assert row.rstrip().endswith("FAIL")
    assert next(line for line in out.splitlines() if "q after norm" in line).rstrip().endswith("pass")


def test_without_transformers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    assert _cli(["parity", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install moepipe[parity]" in err


def test_bad_layers(unseen, capsys):
    assert _cli(["parity", "--model", str(unseen), "--device", "cpu", "--layers", "0,4"]) == 1
    assert "layer 4 out of range: the model has 4 layers" in capsys.readouterr().err


def test_bad_prompt_input(unseen, capsys):
    assert _cli(["parity", "--model", str(unseen), "--device", "cpu", "--prompt", "hello"]) == 1
    assert "no tokenizer.json to encode --prompt; use --tokens N instead" in capsys.readouterr().err
    assert _cli(["parity", "--model", str(unseen), "--device", "cpu", "--tokens", "0"]) == 1
    assert "--tokens must be >= 1, got 0" in capsys.readouterr().err
