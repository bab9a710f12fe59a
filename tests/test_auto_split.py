"""Automatic split: the search against brute force (with and without the KV-pool constraint), costs
read from stage stats, per-layer clocks and the slow-layer test hook on a real Stage."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from engine.runtime.clock import LayerClock
from engine.tools.auto_split import Costs, MemoryModel, choose_split, costs_from_stats, even_counts
from slow_layers import inject_into_workers, install_slow_layers


def _splits(L: int, S: int):
    return [list(p) for p in itertools.product(range(1, L + 1), repeat=S) if sum(p) == L]


def test_choose_split_is_the_best_contiguous_split():
    rng = random.Random(0)
    for _ in range(150):
        L, S = rng.randint(2, 8), rng.randint(1, 4)
        S = min(S, L)
        c = Costs([rng.random() for _ in range(L)], rng.random(), rng.random())
        best = min(max(c.stage_ms(p)) for p in _splits(L, S))
        got = choose_split(c, S)
        assert sum(got) == L and min(got) >= 1 and len(got) == S
        assert max(c.stage_ms(got)) == pytest.approx(best, abs=1e-12)


def test_heavy_layer_and_head():
    # layer 0 ten times the others: it gets a stage nearly to itself
    assert choose_split(Costs([10, 1, 1, 1, 1, 1, 1, 1], 0.0, 0.0), 2) == [1, 7]
    # 48 equal layers, an embedding of 2 layers' worth and a head of 6: stage times even out exactly
    c = Costs([1.0] * 48, 2.0, 6.0)
    assert choose_split(c, 4) == [12, 14, 14, 8] and c.stage_ms([12, 14, 14, 8]) == [14.0] * 4


def test_memory_keeps_the_pool():
    """The last stage is slow but holds the big head: moving layers onto stage 0 would be fastest,
    yet stage 0's card is small, so the search stops where stage 0 still holds the even split's pool."""
    L, S = 8, 2
    mem = MemoryModel(card_bytes=[1000, 4000], layer_bytes=[50] * L, embed_bytes=100, head_bytes=2000,
                      reserve_bytes=100, kv_bytes_per_token_layer=1)
    c = Costs([1.0] * L, 0.0, 6.0)
    floor = mem.pool_tokens(even_counts(L, S))
    got = choose_split(c, S, mem)
    assert mem.pool_tokens(got) >= floor
    feasible = [p for p in _splits(L, S) if mem.pool_tokens(p) >= floor]
    assert max(c.stage_ms(got)) == pytest.approx(min(max(c.stage_ms(p)) for p in feasible))
    assert choose_split(c, S) != got  # without the constraint it would shrink the pool
    assert mem.pool_tokens(choose_split(c, S)) < floor
    with pytest.raises(ValueError, match="KV pool of 10000 tokens"):
        choose_split(c, S, mem, min_pool_tokens=10000)


def test_costs_from_stats():
    stats = [{"layer_ms": {0: 3.0, 1: 1.0}, "busy_ms": 5.0},
             {"layer_ms": {2: 1.0}, "busy_ms": 1.5},
             {"layer_ms": {3: 2.0}, "busy_ms": 4.0, "sample_ms": 1.0}]
    c = costs_from_stats(stats, 4)
    assert c.layer_ms == [3.0, 1.0, 1.5, 2.0] and c.embed_ms == 1.0 and c.head_ms == 3.0
    assert c.stage_ms([2, 1, 1]) == [5.0, 1.5, 5.0]
    # half the busy time in graph replays the clocks did not see: clocked times scale by busy/eager
    stats[0].update(eager_ms=2.5, busy_ms=5.0, layer_ms={0: 1.5, 1: 0.5})
    assert costs_from_stats(stats, 4).layer_ms[:2] == [3.0, 1.0]


def test_layer_clock_sees_the_slow_layer():
    from loader.load import load_stage
    from loader.partition import partition
    from loader.writer import ensure_cached_preset
    from model.batch import AttnBatch
    from model.config import ModelConfig
    path = ensure_cached_preset("tiny")
    cfg = ModelConfig.from_file(path)
    stage = load_stage(path, cfg, partition(cfg.num_hidden_layers, 2)[1], "cpu", torch.float32)
    stage.allocate_kv(2, 16)
    batch = AttnBatch.build([8], [8], [[0]], 16, [True], "cpu")
    stage(torch.randn(8, cfg.hidden_size), batch)  # first-call costs out of the way
    install_slow_layers(stage, {3: 30.0})  # installed first, as the workers' hook does at load
    clock = LayerClock(stage)
    stage(torch.randn(8, cfg.hidden_size), batch)
    ms = clock.remove()
    assert set(ms) == {-1, 2, 3} and ms[3] >= 30 and ms[-1] >= ms[2] + ms[3]  # the spin is inside layer 3's time
    stage(torch.randn(8, cfg.hidden_size), batch)  # hooks gone: nothing more recorded
    assert clock.collect() == ms


def test_llm_auto_split_evens_a_heavy_stage(monkeypatch, tmp_path, capsys):
    """Layer 0 spins 150 ms of CPU time per forward: the even split 2,2 leaves stage 0 far busier,
    so 'auto' moves layer 1 to stage 1 and restarts the stages on 1,3."""
    from engine import LLM, SamplingParams
    from loader.writer import ensure_cached_preset
    inject_into_workers(monkeypatch, tmp_path, "0:150")
    with LLM(str(ensure_cached_preset("tiny")), stages=2, device="cpu", layers="auto", kv_cache_gib=0.02) as llm:
        rep = llm.auto_split
        assert rep["before"] == [2, 2] and rep["after"] == [1, 3]
        assert [s["layers"] for s in llm.stage_info] == [[0, 1], [1, 4]]
        assert rep["layer_ms"][0] > max(rep["layer_ms"][1:])  # the clocks saw the slow layer
        assert max(rep["predicted_ms"]) < max(rep["before_ms"])
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(out[0].token_ids) == 3
    assert "auto split: layers 1,3" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_plan_weights_match_loaded_stages(tmp_path, tied):
    """The plan's per-stage weight bytes (the split's memory model) equal the parameter bytes of
    the stages the loader builds, for 2 and 3 stages (embedding on the first, head on the last)."""
    from engine.tools.auto_split import memory_model
    from engine.tools.plan import stage_plan
    from loader.load import load_stage
    from loader.partition import partition
    from loader.presets import preset_config
    from loader.writer import write_checkpoint
    from model.config import ModelConfig
    d = preset_config("tiny")
    d["tie_word_embeddings"] = tied
    write_checkpoint(tmp_path, d)
    cfg = ModelConfig.from_file(tmp_path)
    for S in (2, 3):
        plan = stage_plan(cfg, S, 128, 1.0, torch.float32)
        mem = memory_model(cfg, S, torch.float32, [2**30] * S, reserve_gib=0.0)
        for spec, row in zip(partition(cfg.num_hidden_layers, S), plan.per_stage):
            stage = load_stage(tmp_path, cfg, spec, "cpu", torch.float32)
            loaded = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in stage.parameters()}.values())
            assert row.weight_bytes == loaded, (S, spec.rank)
            model_bytes = sum(mem.layer_bytes[spec.start:spec.end]) + mem.embed_bytes * spec.has_embed \
                + mem.head_bytes * spec.has_head
            assert model_bytes == loaded, (S, spec.rank)
