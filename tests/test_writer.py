"""Random-weight checkpoint writer: HF layout, safetensors bytes, sharding, tokenizer, CLI, cache."""
from __future__ import annotations

import argparse
import json
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loader import writer
from loader.presets import preset_config
from engine.cli.make_checkpoint import add_parser as add_make_checkpoint_parser
from engine.cli.make_checkpoint import run as run_make_checkpoint
from loader.writer import (CACHE_VERSION, ensure_cached_preset, generate_tensor, generation_config, plan_checkpoint,
                           plan_tensors, train_tokenizer, write_checkpoint)

TINY = preset_config("tiny")


def read_all(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in d; fails on a name stored twice."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = sf.get_tensor(k)
    return out


def fuse_experts(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Per-expert names -> transformers v5 in-memory names (gate_up_proj [E,2I,H], down_proj [E,H,I])."""
    E, L = config["num_experts"], config["num_hidden_layers"]
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in range(L):
        x = f"model.layers.{i}.mlp.experts."
        if x + "0.gate_proj.weight" not in sd:  # dense layer
            continue
        out[x + "gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{x}{e}.gate_proj.weight"], sd[f"{x}{e}.up_proj.weight"]], 0) for e in range(E)])
        out[x + "down_proj"] = torch.stack([sd[f"{x}{e}.down_proj.weight"] for e in range(E)])
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def hf_state_dict(d: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info[key])
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_fused_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fused"), TINY, seed=0, fused_experts=True)


# ---- content and transformers parity -------------------------------------------------------------
def test_tiny_loads_in_transformers(tiny_dir: Path) -> None:
    stored = read_all(tiny_dir)
    assert_same(hf_state_dict(tiny_dir), fuse_experts(stored, TINY))


def test_user_mini_loads_in_transformers(tmp_path: Path) -> None:
    cfg = preset_config("user-mini")
    d = write_checkpoint(tmp_path, cfg, seed=3)
    assert_same(hf_state_dict(d), fuse_experts(read_all(d), cfg))


def test_stored_values_match_plan_and_generator(tiny_dir: Path) -> None:
    stored = read_all(tiny_dir)
    planned = plan_tensors(TINY, torch.float32)
    raw = (tiny_dir / "model-00001-of-00001.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__")
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert by_offset == [t.entry.name for t in planned]  # natural order within the shard
    assert sorted(stored) == sorted(by_offset)
    for t in planned:
        assert torch.equal(stored[t.entry.name], generate_tensor(t, seed=0)), t.entry.name


def test_value_distributions(tiny_dir: Path) -> None:
    sd = read_all(tiny_dir)
    norms = [k for k in sd if k.endswith("norm.weight")]
    assert len(norms) == 4 * 4 + 1
    for k in norms:
        v = sd[k]
        assert not torch.allclose(v, torch.ones_like(v)), k  # a missed norm weight must show
        assert abs(v.mean().item() - 1) < 0.1 and 0.05 < v.std().item() < 0.15, k
    emb = sd["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 0.001 and abs(emb.mean().item()) < 0.001


def test_deterministic_in_seed(tmp_path: Path, tiny_dir: Path) -> None:
    again = read_all(write_checkpoint(tmp_path / "a", TINY, seed=0, workers=3))
    assert_same(again, read_all(tiny_dir))
    other = read_all(write_checkpoint(tmp_path / "b", TINY, seed=1))
    assert not torch.equal(other["lm_head.weight"], again["lm_head.weight"])


def test_bf16_is_fp32_cast(tmp_path: Path, tiny_dir: Path) -> None:
    bf = read_all(write_checkpoint(tmp_path, TINY, dtype="bfloat16", tokenizer=False))
    ref = read_all(tiny_dir)
    assert_same(bf, {k: v.to(torch.bfloat16) for k, v in ref.items()})


def test_fused_layout(tiny_fused_dir: Path, tiny_dir: Path) -> None:
    fused = read_all(tiny_fused_dir)
    E, H, I = TINY["num_experts"], TINY["hidden_size"], TINY["moe_intermediate_size"]
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)
    assert fused["model.layers.0.mlp.experts.down_proj"].shape == (E, H, I)
    assert not any(".experts.0." in k for k in fused)
    assert_same(fused, fuse_experts(read_all(tiny_dir), TINY))
    assert_same(hf_state_dict(tiny_fused_dir), fused)


def test_tied_embeddings_omit_lm_head(tmp_path: Path) -> None:
    cfg = dict(TINY, tie_word_embeddings=True)
    names = [t.entry.name for t in plan_tensors(cfg, torch.float32)]
    assert "lm_head.weight" not in names and names[-1] == "model.norm.weight"


def test_dense_layers(tmp_path: Path) -> None:
    cfg = dict(TINY, mlp_only_layers=[1], decoder_sparse_step=1)
    d = write_checkpoint(tmp_path, cfg, tokenizer=False)
    sd = read_all(d)
    assert sd["model.layers.1.mlp.gate_proj.weight"].shape == (cfg["intermediate_size"], cfg["hidden_size"])
    assert sd["model.layers.1.mlp.down_proj.weight"].shape == (cfg["hidden_size"], cfg["intermediate_size"])
    assert "model.layers.1.mlp.gate.weight" not in sd
    assert_same(hf_state_dict(d), fuse_experts(sd, cfg))


# ---- files, index, sharding, header --------------------------------------------------------------
def check_index(d: Path) -> dict:
    index = json.loads((d / writer.INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    wm = index["weight_map"]
    seen: dict[str, str] = {}
    total = 0
    for f in sorted(d.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                assert k not in seen
                seen[k] = f.name
                t = sf.get_slice(k)
                total += torch.Size(t.get_shape()).numel() * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    assert seen == wm
    assert index["metadata"]["total_size"] == total
    return index


def test_index_covers_every_tensor(tiny_dir: Path) -> None:
    index = check_index(tiny_dir)
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert len(index["weight_map"]) == 4 * (9 + 3 * 8) + 3


def test_multi_shard(tmp_path: Path, tiny_dir: Path) -> None:
    shard_bytes = 200_000
    d = write_checkpoint(tmp_path, TINY, shard_bytes=shard_bytes)
    files = sorted(d.glob("model-*.safetensors"))
    n = len(files)
    assert n > 3 and [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    plan = plan_checkpoint(TINY, shard_bytes=shard_bytes)
    for s in plan.shards:
        assert s.nbytes <= shard_bytes or len(s.tensors) == 1
    check_index(d)
    assert_same(read_all(d), read_all(tiny_dir))
    assert_same(hf_state_dict(d), fuse_experts(read_all(tiny_dir), TINY))


def test_single_file(tmp_path: Path, tiny_dir: Path) -> None:
    d = write_checkpoint(tmp_path, TINY, single_file=True, tokenizer=False)
    assert (d / "model.safetensors").exists() and not (d / writer.INDEX_NAME).exists()
    assert_same(read_all(d), read_all(tiny_dir))
    assert_same(hf_state_dict(d), fuse_experts(read_all(tiny_dir), TINY))


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY, shard_bytes=200_000, tokenizer=False)
    write_checkpoint(tmp_path, TINY, tokenizer=False)
    assert [f.name for f in tmp_path.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]


def test_small_blocks_stitch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    """Big tensors are generated in row blocks; force many blocks and check the bytes line up."""
    monkeypatch.setattr(writer, "BLOCK_ELEMS", 1000)
    planned = plan_tensors(TINY, torch.float32)
    assert planned[0].parts[0].num_blocks == -(-512 // (1000 // 64))
    d = write_checkpoint(tmp_path, TINY, tokenizer=False)
    sd = read_all(d)
    for t in planned:
        assert torch.equal(sd[t.entry.name], generate_tensor(t, seed=0)), t.entry.name
    hf_state_dict(d)


def test_header_bytes(tiny_dir: Path) -> None:
    f = tiny_dir / "model-00001-of-00001.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert raw[8:8 + n].rstrip(b" ").endswith(b"}")
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == len(raw) - 8 - n
    assert {v["dtype"] for v in header.values()} == {"F32"}
    from safetensors.torch import load_file
    assert_same(load_file(str(f)), read_all(tiny_dir))


def test_header_matches_safetensors_library(tmp_path: Path) -> None:
    """For a one-tensor file our bytes equal what safetensors.torch.save_file writes."""
    from safetensors.torch import save_file
    from loader.safetensors_stream import SafetensorsStreamWriter, TensorEntry
    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    with SafetensorsStreamWriter(tmp_path / "ours.safetensors", [TensorEntry("w", (3, 5), torch.bfloat16)]) as w:
        w.write(t[:1])
        w.write(t[1:])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_stream_writer_rejects_wrong_sizes(tmp_path: Path) -> None:
    from loader.safetensors_stream import SafetensorsStreamWriter, TensorEntry
    with pytest.raises(ValueError):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", [TensorEntry("w", (2, 2), torch.float32)]) as w:
            w.write(torch.zeros(3))
    with pytest.raises(ValueError):
        with SafetensorsStreamWriter(tmp_path / "y.safetensors", [TensorEntry("w", (2, 2), torch.float32)]) as w:
            w.write(torch.zeros(5))


def test_config_files(tiny_dir: Path) -> None:
    assert json.loads((tiny_dir / "config.json").read_text()) == TINY
    assert json.loads((tiny_dir / "generation_config.json").read_text()) == {"eos_token_id": [2, 0], "pad_token_id": 0}
    real = generation_config(preset_config("qwen3-30b-a3b"))
    assert real == {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


# ---- real-shape planning (no data written) -------------------------------------------------------
@pytest.mark.parametrize("name,count,total", [("qwen3-30b-a3b", 18867, 61.06e9), ("qwen3-235b-a22b", 36945, 470.2e9)])
def test_plan_real_shapes(name: str, count: int, total: float) -> None:
    cfg = preset_config(name)
    plan = plan_checkpoint(cfg)
    L, E = cfg["num_hidden_layers"], cfg["num_experts"]
    assert plan.num_tensors == count == L * (9 + 3 * E) + 3
    assert plan.dtype == torch.bfloat16
    assert abs(plan.total_size - total) < 0.1e9
    assert all(s.nbytes <= 2 * 2**30 for s in plan.shards)
    assert len(plan.weight_map()) == count
    first = plan.shards[0].tensors
    assert first[0].entry.name == "model.embed_tokens.weight" and first[0].entry.shape == (151936, cfg["hidden_size"])
    assert first[0].parts[0].num_blocks > 1  # embed made in row blocks, never whole in fp32
    assert plan.shards[-1].tensors[-1].entry.name == "lm_head.weight"
    fused = plan_checkpoint(cfg, fused_experts=True)
    assert fused.num_tensors == L * (9 + 2) + 3 and fused.total_size == plan.total_size


def test_plan_30b_shards() -> None:
    plan = plan_checkpoint(preset_config("qwen3-30b-a3b"))
    n = len(plan.shards)
    assert n == 29 and plan.shards[-1].filename == f"model-{n:05d}-of-{n:05d}.safetensors"
    big = plan_checkpoint(preset_config("qwen3-30b-a3b"), shard_bytes=4 * 10**9)
    assert 15 <= len(big.shards) <= 17


# ---- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_roundtrip(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    s = 'The miller\'s daughter asked: "How much is a room?" It costs 42 coins.\nThanks!'
    ids = tok(s)["input_ids"]
    assert tok.decode(ids) == s and max(ids) < TINY["vocab_size"]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and tok.bos_token is None
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"][0] == 1
    assert len(tok) <= TINY["vocab_size"]


def test_tokenizer_deterministic_and_quick() -> None:
    t0 = time.monotonic()
    a = train_tokenizer(512).to_str()
    assert time.monotonic() - t0 < 2.0
    assert a == train_tokenizer(512).to_str()
    assert train_tokenizer(512).get_vocab_size() == 512


# ---- CLI and cache -------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="engine")
    add_make_checkpoint_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(argv)


def test_cli_make_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ck"
    args = parse(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "5", "--dtype", "bfloat16",
                  "--fused-experts", "--yarn"])
    assert args.run(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["torch_dtype"] == "bfloat16"
    sd = read_all(out)
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd and sd["lm_head.weight"].dtype == torch.bfloat16

    assert run_make_checkpoint(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--force" in err[0]
    assert run_make_checkpoint(parse(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--force"])) == 0
    assert "model.layers.0.mlp.experts.0.up_proj.weight" in read_all(out)


def test_cli_bad_preset() -> None:
    with pytest.raises(SystemExit):
        parse(["make-checkpoint", "--preset", "nope", "--out", "x"])


def test_ensure_cached_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEPIPE_CACHE", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_cached_preset("tiny"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / f"tiny-{CACHE_VERSION}"] * 3
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{CACHE_VERSION}"]  # no temp dirs left behind
    check_index(results[0])
    mtime = (results[0] / "config.json").stat().st_mtime_ns
    assert ensure_cached_preset("tiny") == results[0]
    assert (results[0] / "config.json").stat().st_mtime_ns == mtime
