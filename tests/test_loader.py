"""Checkpoint loading: partitions cover every tensor once, stages open only their shards, loaded
parameters equal the stored tensors, bad checkpoints and configs fail naming the file, tensor and
shapes, and a transformers-saved checkpoint of an unusual config matches transformers' logits."""
from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loader.load as load_mod
from loader.checkpoint import INDEX_NAME, CheckpointError, CheckpointIndex, read_header
from loader.load import load_stage, stage_placements
from loader.partition import partition
from loader.presets import preset_config
from loader.writer import write_checkpoint
from model.config import ConfigError, ModelConfig

SHARD_BYTES = 200_000  # the tiny preset (~1.3 MB in fp32) splits into several shards
TINY = preset_config("tiny")


def tied_config() -> dict:
    return dict(TINY, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Per-expert, fused and tied tiny checkpoints of one seed, each in several shards."""
    out = {}
    for name, cfg, fused in (("experts", TINY, False), ("fused", TINY, True), ("tied", tied_config(), False)):
        d = tmp_path_factory.mktemp(name)
        write_checkpoint(d, cfg, seed=5, shard_bytes=SHARD_BYTES, fused_experts=fused)
        out[name] = d
    return out


@pytest.fixture
def ckpt_copy(ckpts, tmp_path) -> Path:
    """A private copy of the per-expert checkpoint for tests that damage it."""
    d = tmp_path / "ckpt"
    shutil.copytree(ckpts["experts"], d)
    return d


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index))


def shard_of(folder: Path, name: str) -> Path:
    return folder / read_index(folder)["weight_map"][name]


def rewrite_shard(folder: Path, name: str, edit) -> Path:
    """Load the shard holding `name`, apply edit(dict) in place, save it back."""
    f = shard_of(folder, name)
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    return f


# ---- 1. coverage -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["experts", "fused", "tied"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_partitions_cover_every_tensor_once(ckpts, kind, stages):
    folder = ckpts[kind]
    index = CheckpointIndex(folder)
    assert len(index.files_for(index.names)) >= 4, "expected a multi-shard checkpoint"
    cfg = ModelConfig.from_file(folder)
    tied = cfg.tie_word_embeddings
    assert ("lm_head.weight" in index.names) == (not tied)
    owner: dict[str, int] = {}
    for spec in partition(cfg.num_hidden_layers, stages):
        chosen = stage_placements(index, cfg, spec)
        names = {n for n, _ in chosen}
        for n in names:
            if n in owner:
                assert tied and n == "model.embed_tokens.weight" and owner[n] == 0 and spec.is_last and stages > 1, \
                    f"{n} placed on stages {owner[n]} and {spec.rank}"
            else:
                owner[n] = spec.rank
        # the placed pieces add up to exactly this stage's parameter sizes (nothing filled twice or left out)
        params = sum(p.numel() for p in _stage_param_shapes(cfg, spec).values())
        assert sum(torch.Size(p.shape).numel() for _, p in chosen) == params
        if tied and spec.is_last:
            heads = [n for n, p in chosen if p.param == "lm_head.weight"]
            assert heads == ["model.embed_tokens.weight"]
    assert set(owner) == set(index.names)


def _stage_param_shapes(cfg, spec) -> dict[str, torch.Tensor]:
    from model.stage import Stage
    stage = Stage(cfg, spec.start, spec.end, spec.has_embed, spec.has_head, "meta", torch.float32)
    return dict(stage.named_parameters())


@pytest.mark.parametrize("stages", [2, 3])
def test_tied_head_is_the_embedding(ckpts, stages):
    folder = ckpts["tied"]
    cfg = ModelConfig.from_file(folder)
    specs = partition(cfg.num_hidden_layers, stages)
    first = load_stage(folder, cfg, specs[0], "cpu", torch.float32)
    last = load_stage(folder, cfg, specs[-1], "cpu", torch.float32)
    emb = stored(folder)["model.embed_tokens.weight"]
    assert torch.equal(first.embed_tokens.weight, emb)
    assert torch.equal(last.lm_head.weight, emb)
    assert not hasattr(last, "embed_tokens") or not last.has_embed


# ---- 2 + 3. shards opened and values loaded ------------------------------------------------------
@pytest.mark.parametrize("kind", ["experts", "fused", "tied"])
@pytest.mark.parametrize("stages", [1, 3])
def test_stage_opens_only_its_shards_and_loads_stored_values(ckpts, kind, stages, monkeypatch):
    folder = ckpts[kind]
    cfg = ModelConfig.from_file(folder)
    index = CheckpointIndex(folder)
    tensors = stored(folder)
    opened: list[str] = []
    real = load_mod.safe_open

    def recording(path, *a, **kw):
        opened.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(load_mod, "safe_open", recording)
    I = cfg.moe_intermediate_size
    for spec in partition(cfg.num_hidden_layers, stages):
        opened.clear()
        stage = load_stage(folder, cfg, spec, "cpu", torch.float32)
        chosen = stage_placements(index, cfg, spec)
        expected = {str(f) for f in index.files_for([n for n, _ in chosen])}
        assert set(opened) == expected
        assert len(opened) == len(expected), "a shard was opened twice"
        if stages > 1:
            assert expected != {str(f) for f in index.files_for(index.names)}
        params = dict(stage.named_parameters())
        for name, p in chosen:
            assert torch.equal(params[p.param][p.index], tensors[name]), name
        # explicit fused-slice check for one sparse layer of this stage
        i = spec.start
        gu = params[f"layers.{i}.mlp.experts.gate_up_proj"]
        dn = params[f"layers.{i}.mlp.experts.down_proj"]
        x = f"model.layers.{i}.mlp.experts."
        for e in (0, cfg.num_experts - 1):
            if kind == "fused":
                assert torch.equal(gu[e], tensors[x + "gate_up_proj"][e])
                assert torch.equal(dn[e], tensors[x + "down_proj"][e])
            else:
                assert torch.equal(gu[e, :I], tensors[f"{x}{e}.gate_proj.weight"])
                assert torch.equal(gu[e, I:2 * I], tensors[f"{x}{e}.up_proj.weight"])
                assert torch.equal(dn[e], tensors[f"{x}{e}.down_proj.weight"])


def test_fused_and_per_expert_layouts_load_identically(ckpts):
    cfg = ModelConfig.from_file(ckpts["experts"])
    spec = partition(cfg.num_hidden_layers, 1)[0]
    a = dict(load_stage(ckpts["experts"], cfg, spec, "cpu", torch.float32).named_parameters())
    b = dict(load_stage(ckpts["fused"], cfg, spec, "cpu", torch.float32).named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_single_file_checkpoint(tmp_path, ckpts):
    write_checkpoint(tmp_path, TINY, seed=5, single_file=True)
    assert not (tmp_path / INDEX_NAME).exists()
    cfg = ModelConfig.from_file(tmp_path)
    for spec in partition(cfg.num_hidden_layers, 2):
        a = dict(load_stage(tmp_path, cfg, spec, "cpu", torch.float32).named_parameters())
        b = dict(load_stage(ckpts["experts"], cfg, spec, "cpu", torch.float32).named_parameters())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_load_of_fp32_checkpoint(ckpts):
    folder = ckpts["experts"]
    cfg = ModelConfig.from_file(folder)
    spec = partition(cfg.num_hidden_layers, 2)[1]
    stage = load_stage(folder, cfg, spec, "cpu", torch.bfloat16)
    w = stored(folder)["lm_head.weight"]
    assert stage.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(stage.lm_head.weight, w.to(torch.bfloat16))


# ---- 4. bad checkpoints --------------------------------------------------------------------------
def _load_all(folder: Path, stages: int = 1):
    cfg = ModelConfig.from_file(folder)
    return [load_stage(folder, cfg, s, "cpu", torch.float32) for s in partition(cfg.num_hidden_layers, stages)]


def test_missing_tensor(ckpt_copy):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    rewrite_shard(ckpt_copy, name, lambda t: t.pop(name))
    index = read_index(ckpt_copy)
    del index["weight_map"][name]
    write_index(ckpt_copy, index)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        _load_all(ckpt_copy)
    # stage 1 of 2 (layers 2, 3) does not need it and still loads; stage 0 names the missing piece
    cfg = ModelConfig.from_file(ckpt_copy)
    s0, s1 = partition(cfg.num_hidden_layers, 2)
    load_stage(ckpt_copy, cfg, s1, "cpu", torch.float32)
    with pytest.raises(CheckpointError) as e:
        load_stage(ckpt_copy, cfg, s0, "cpu", torch.float32)
    assert name in str(e.value) and "stage 0" in str(e.value)


def test_tensor_in_index_but_not_in_shard(ckpt_copy):
    name = "model.layers.2.self_attn.k_proj.weight"
    f = rewrite_shard(ckpt_copy, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as e:
        _load_all(ckpt_copy)
    assert name in str(e.value) and f.name in str(e.value)


def test_unexpected_tensor(ckpt_copy):
    bogus = "model.layers.0.mlp.bogus.weight"
    host = "model.layers.0.mlp.gate.weight"
    f = rewrite_shard(ckpt_copy, host, lambda t: t.__setitem__(bogus, torch.zeros(3, 4)))
    index = read_index(ckpt_copy)
    index["weight_map"][bogus] = f.name
    write_index(ckpt_copy, index)
    with pytest.raises(CheckpointError, match="unexpected tensor") as e:
        _load_all(ckpt_copy)
    assert bogus in str(e.value) and f.name in str(e.value)


def test_layer_beyond_config_is_unexpected(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the file still holds layer 3
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.3\."):
        _load_all(ckpt_copy)


def test_wrong_shape(ckpt_copy):
    name = "model.layers.0.self_attn.q_proj.weight"
    f = rewrite_shard(ckpt_copy, name, lambda t: t.__setitem__(name, torch.zeros(128, 60)))
    with pytest.raises(CheckpointError) as e:
        _load_all(ckpt_copy)
    msg = str(e.value)
    assert name in msg and "[128, 60]" in msg and "[128, 64]" in msg and f.name in msg


def test_wrong_expert_shape(ckpt_copy):
    name = "model.layers.3.mlp.experts.7.down_proj.weight"
    f = rewrite_shard(ckpt_copy, name, lambda t: t.__setitem__(name, torch.zeros(64, 31)))
    with pytest.raises(CheckpointError) as e:
        _load_all(ckpt_copy, stages=2)
    msg = str(e.value)
    assert name in msg and "[64, 31]" in msg and "[64, 32]" in msg and f.name in msg


def test_shard_missing_on_disk(ckpt_copy):
    f = shard_of(ckpt_copy, "model.layers.2.mlp.gate.weight")
    f.unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        _load_all(ckpt_copy)
    assert f.name in str(e.value)


def test_truncated_shard(ckpt_copy):
    f = shard_of(ckpt_copy, "model.layers.1.mlp.gate.weight")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        _load_all(ckpt_copy)
    assert f.name in str(e.value)
    f.write_bytes(data[:5])  # not even the header length
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_header(f)
    assert f.name in str(e.value)


def test_corrupt_header(ckpt_copy):
    f = shard_of(ckpt_copy, "model.layers.1.mlp.gate.weight")
    data = bytearray(f.read_bytes())
    data[8:24] = b"\xff" * 16
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        _load_all(ckpt_copy)
    assert f.name in str(e.value)
    # an absurd header length is reported too, not read
    data[:8] = struct.pack("<Q", 2**40)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        read_header(f)
    assert f.name in str(e.value)


def test_header_entry_without_offsets(ckpt_copy):
    f = shard_of(ckpt_copy, "model.layers.1.mlp.gate.weight")
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    victim = next(k for k in header if k != "__metadata__")
    del header[victim]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="corrupt header entry") as e:
        read_header(f)
    assert victim in str(e.value) and f.name in str(e.value)


def test_fused_and_per_expert_for_one_layer(ckpt_copy, ckpts):
    fused = stored(ckpts["fused"])
    x = "model.layers.2.mlp.experts."
    host = "model.layers.2.mlp.gate.weight"
    f = rewrite_shard(ckpt_copy, host, lambda t: t.update({x + "gate_up_proj": fused[x + "gate_up_proj"],
                                                            x + "down_proj": fused[x + "down_proj"]}))
    index = read_index(ckpt_copy)
    index["weight_map"][x + "gate_up_proj"] = index["weight_map"][x + "down_proj"] = f.name
    write_index(ckpt_copy, index)
    with pytest.raises(CheckpointError, match="already filled") as e:
        _load_all(ckpt_copy)
    assert x in str(e.value)
    # the stage not holding layer 2 is unaffected
    cfg = ModelConfig.from_file(ckpt_copy)
    load_stage(ckpt_copy, cfg, partition(cfg.num_hidden_layers, 2)[0], "cpu", torch.float32)


def test_no_index_and_no_single_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors") as e:
        _load_all(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_malformed_index(ckpt_copy):
    (ckpt_copy / INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="malformed index") as e:
        CheckpointIndex(ckpt_copy)
    assert INDEX_NAME in str(e.value)
    (ckpt_copy / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed index"):
        CheckpointIndex(ckpt_copy)


# ---- 4b. config errors ---------------------------------------------------------------------------
def write_config(tmp_path: Path, cfg: dict | str) -> Path:
    f = tmp_path / "config.json"
    f.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return f


def test_config_missing_key(tmp_path):
    cfg = dict(TINY)
    del cfg["hidden_size"]
    f = write_config(tmp_path, cfg)
    with pytest.raises(ConfigError, match="'hidden_size'") as e:
        ModelConfig.from_file(tmp_path)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("key,value", [("num_hidden_layers", "4"), ("num_attention_heads", 4.0),
                                       ("num_experts", True), ("vocab_size", None), ("hidden_size", 0)])
def test_config_non_integer(tmp_path, key, value):
    f = write_config(tmp_path, dict(TINY, **{key: value}))
    with pytest.raises(ConfigError, match=repr(key)) as e:
        ModelConfig.from_file(f)
    assert str(f) in str(e.value)


def test_config_unsupported_model_type(tmp_path):
    f = write_config(tmp_path, dict(TINY, model_type="llama"))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'") as e:
        ModelConfig.from_file(f)
    assert str(f) in str(e.value)


def test_config_invalid_json(tmp_path):
    f = write_config(tmp_path, '{"model_type": "qwen3_moe", "hidden_size": 64,')
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        ModelConfig.from_file(tmp_path)
    assert str(f) in str(e.value)
    write_config(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_file(tmp_path)


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_file(tmp_path)


@pytest.mark.parametrize("block", [{"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_config_unsupported_rope(tmp_path, block):
    f = write_config(tmp_path, dict(TINY, rope_scaling=block))
    with pytest.raises(ConfigError, match="rope type") as e:
        ModelConfig.from_file(f)
    assert repr(block.get("rope_type", block.get("type"))) in str(e.value) and str(f) in str(e.value)
    f = write_config(tmp_path, dict(TINY, rope_parameters=dict(block, rope_theta=1e6)))
    with pytest.raises(ConfigError, match="rope type"):
        ModelConfig.from_file(f)


def _v5(cfg: dict) -> dict:
    """transformers v5 spellings of a v4 config: rope_parameters, num_local_experts, dtype."""
    d = dict(cfg)
    block = dict(d.pop("rope_scaling", None) or {"rope_type": "default"})
    block["rope_theta"] = d.pop("rope_theta")
    d["rope_parameters"] = block
    d["num_local_experts"] = d.pop("num_experts")
    d["dtype"] = d.pop("torch_dtype")
    return d


@pytest.mark.parametrize("preset", ["tiny", "user-mini"])
def test_config_v5_spellings(preset):
    v4 = preset_config(preset)
    v4["torch_dtype"] = "bfloat16"
    v5 = _v5(v4)
    assert "rope_theta" not in v5 and "num_experts" not in v5 and "torch_dtype" not in v5
    a = ModelConfig.from_dict(v4, source="x")
    b = ModelConfig.from_dict(v5, source="x")
    assert a == b
    assert b.dtype == torch.bfloat16 and b.num_experts == v4["num_experts"]
    assert b.rope.theta == v4["rope_theta"]
    if preset == "user-mini":
        assert b.rope.rope_type == "yarn" and b.rope.factor == 4.0 and b.rope.original_max_position_embeddings == 256


def test_config_head_dim_from_file_or_derived():
    a = ModelConfig.from_dict(TINY)
    assert a.head_dim == 32 and a.q_size == 128  # head_dim from the file, != hidden/heads
    d = dict(TINY)
    del d["head_dim"]
    b = ModelConfig.from_dict(d)
    assert b.head_dim == 64 // 4 and b.q_size == 64
    assert dataclasses.replace(b, head_dim=32, extra={}) == dataclasses.replace(a, extra={})


# ---- 5. partition errors -------------------------------------------------------------------------
def test_partition_errors():
    with pytest.raises(ValueError, match="exceeds"):
        partition(4, 5)
    with pytest.raises(ValueError, match=">= 1"):
        partition(4, 0)
    with pytest.raises(ValueError, match=r"\[2, 1\].*4 layers"):
        partition(4, 2, [2, 1])
    with pytest.raises(ValueError, match="positive"):
        partition(4, 2, [4, 0])
    with pytest.raises(ValueError):
        partition(4, 3, [2, 2])  # wrong number of counts
    specs = partition(5, 3, [1, 3, 1])
    assert [(s.start, s.end) for s in specs] == [(0, 1), (1, 4), (4, 5)]
    assert [(s.start, s.end) for s in partition(5, 3)] == [(0, 2), (2, 4), (4, 5)]
    assert specs[0].has_embed and not specs[0].has_head and specs[-1].has_head and not specs[-1].has_embed


# ---- 6. an unseen transformers-saved config -------------------------------------------------------
ODD = dict(num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=3, head_dim=20, num_experts=12,
           num_experts_per_tok=5, mlp_only_layers=[2], decoder_sparse_step=1, tie_word_embeddings=True,
           hidden_size=48, intermediate_size=72, moe_intermediate_size=24, norm_topk_prob=False)


@pytest.mark.parametrize("fused", [False, True])
def test_transformers_saved_unusual_config_matches_logits(tmp_path, fused):
    from hf_ref import engine_trace, hf_config, hf_trace, load_hf, save_hf_model
    path = save_hf_model(hf_config(**ODD), tmp_path / "hf", seed=7, fused=fused)
    index = CheckpointIndex(path)
    assert "lm_head.weight" not in index.names  # tied: the loader must use the embedding
    assert "model.layers.2.mlp.gate_proj.weight" in index.names  # the dense layer
    assert any(".experts.gate_up_proj" in n for n in index.names) == fused
    cfg = ModelConfig.from_file(path)
    assert cfg.head_dim == 20 and cfg.num_experts == 12 and not cfg.is_sparse(2) and cfg.is_sparse(3)
    for stages in (2, 3, 5):  # every split of this checkpoint covers it
        names = [n for s in partition(5, stages) for n, _ in stage_placements(index, cfg, s)]
        assert set(names) == set(index.names)
    ids = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(1))
    ref = hf_trace(load_hf(path), ids)["logits"]
    got = engine_trace(path, ids)["logits"]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
