"""bench/bench_breakdown.py: the CPU smoke run of the real engine (every group measured, the rows add
up to the measured step), the GPU trace grouping on a synthetic kineto trace, and the floors against
direct counts."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from breakdown import (GROUPS, expected_experts, floor_bytes, from_chrome_trace, gpu_group,  # noqa: E402
                       top_kernels)


def test_cpu_smoke_rows_add_up(tmp_path):
    import bench_breakdown
    out = tmp_path / "bd.json"
    results = bench_breakdown.main(["--model", "tiny", "--device", "cpu", "--batches", "2,5", "--context", "40",
                                    "--steps", "4", "--warm", "2", "--penalties-at", "5", "--out", str(out)])
    assert out.exists() and [(r["sampling"], r["batch"]) for r in results] == [("greedy", 2), ("greedy", 5), ("penalties", 5)]
    for r in results:
        rows = {x["group"]: x for x in r["rows"]}
        assert list(rows) == list(GROUPS) + ["host"]
        for g in ("attention", "moe", "dense", "norm_rope", "lm_head", "sampler", "copies"):
            assert rows[g]["ms"] > 0, (r["batch"], g)  # every part of the step was seen
        total = sum(x["ms"] for x in r["rows"])
        # ops never overlap on one CPU thread: the groups' self times, plus the host time outside
        # any op, are the measured step (the profiler's own bookkeeping is the tolerance)
        assert abs(total - r["step_ms"]) <= 0.05 * r["step_ms"], (total, r["step_ms"])


def _trace(steps: int, layers: int) -> tuple[list[dict], dict]:
    """A kineto-like trace of `steps` graph replays of `layers` layers, then the sampler, with the
    expected per-group totals (us)."""
    ev, want, t, corr = [], {g: 0.0 for g in GROUPS}, 0.0, 0
    names = [("_rms_norm_kernel", "norm_rope", 2), ("nvjet_tst_128x64_sm90", "dense", 5),
             ("_qkv_norm_rope_write_kernel", "norm_rope", 2), ("_decode_split_kernel", "attention", 9),
             ("_decode_merge_kernel", "attention", 1), ("nvjet_tst_64x64_sm90", "dense", 4),
             ("_add_rms_norm_kernel", "norm_rope", 2), ("_topk_softmax_kernel", "moe", 1),
             ("_gate_up_grouped_kernel", "moe", 20), ("_down_grouped_kernel", "moe", 12)]
    for _ in range(steps):
        corr += 1
        ev.append({"ph": "X", "cat": "user_annotation", "name": "bd.forward", "ts": t, "dur": 5})
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t + 1, "dur": 2,
                   "args": {"correlation": corr}})
        ev.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": t + 2, "dur": 1,
                   "args": {"correlation": corr}})
        want["copies"] += 1
        g = t + 3
        for _ in range(layers):
            for name, grp, dur in names:
                ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": g, "dur": dur, "args": {"correlation": corr}})
                want[grp] += dur
                g += dur
        for name, grp, dur in [("nvjet_tst_256x128_sm90", "lm_head", 150),
                               ("elementwise_kernel<direct_copy_kernel_cuda>", "copies", 30),
                               ("index_elementwise_kernel", "other", 3)]:
            ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": g, "dur": dur, "args": {"correlation": corr}})
            want[grp] += dur
            g += dur
        corr += 1  # the sampler: a reduce kernel that by name alone would be 'other'
        ev.append({"ph": "X", "cat": "user_annotation", "name": "bd.sample", "ts": t + 6, "dur": 3})
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t + 7, "dur": 1,
                   "args": {"correlation": corr}})
        ev.append({"ph": "X", "cat": "kernel", "name": "reduce_kernel<ArgMaxOps>", "ts": g, "dur": 40,
                   "args": {"correlation": corr}})
        want["sampler"] += 40
        t = g + 40 + 10
    # a kernel of a step launched before the window: no launch in the trace, not counted
    ev.append({"ph": "X", "cat": "kernel", "name": "_down_grouped_kernel", "ts": t, "dur": 999,
               "args": {"correlation": 10**6}})
    return ev, want


def test_gpu_trace_groups():
    steps, layers = 3, 4
    ev, want = _trace(steps, layers)
    m = from_chrome_trace(ev, steps, wall_ms=10.0)
    for g in GROUPS:
        assert m.group_ms[g] == pytest.approx(want[g] / 1e3), g
    # busy: the union of device events; the memcpy overlaps nothing, so the sum of the parts
    assert m.busy_ms == pytest.approx(sum(want.values()) / 1e3)
    # the kernels behind 'other' and 'copies', by name, in ms per step (the sampler's reduce is not 'other')
    assert top_kernels(m, "other") == [{"kernel": "index_elementwise_kernel", "ms": pytest.approx(3 / 1e3)}]
    assert [t["kernel"] for t in top_kernels(m, "copies")] == ["elementwise_kernel<direct_copy_kernel_cuda>",
                                                               "Memcpy HtoD"]
    assert top_kernels(m, "copies")[1]["ms"] == pytest.approx(1 / 1e3)


def test_gpu_names():
    assert gpu_group("_decode_split_kernel", "bd.forward") == "attention"
    assert gpu_group("_prefill_fa_kernel", "bd.forward") == "attention"  # 'prefill' holds 'fill'
    assert gpu_group("_filtered_gumbel_kernel", "bd.sample") == "sampler"
    assert gpu_group("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>", None) == "copies"
    assert gpu_group("sm90_xmma_gemm_bf16bf16_bf16f32", "bd.forward") == "gemm"
    assert gpu_group("_linear_small_kernel", "bd.forward") == "gemm"


def test_expected_experts_matches_simulation():
    rng = random.Random(0)
    for E, k, T in ((128, 8, 16), (128, 8, 1), (8, 2, 5)):
        sims = [len(set().union(*(rng.sample(range(E), k) for _ in range(T)))) for _ in range(2000)]
        assert expected_experts(E, k, T) == pytest.approx(sum(sims) / len(sims), rel=0.02)


def test_floor_bytes_counts():
    from loader.dummy import dummy_config
    cfg = dummy_config("qwen3-30b-a3b")
    f = floor_bytes(cfg, 256, 1024.0, 2)
    L, H, I, E = 48, 2048, 768, 128
    assert f["attention"] == 48 * 256 * 1024 * (2 * 4 * 128 * 2)  # k and v, 4 heads of 128, bf16
    # 256 tokens x 8 experts: every expert touched but for rounding
    assert f["moe"] == pytest.approx(L * (E * 3 * I * H * 2 + E * H * 2), rel=1e-3)
    assert f["dense"] == L * ((32 * 128 + 2 * 4 * 128) * H + 32 * 128 * H) * 2
    assert f["lm_head"] == 151936 * H * 2 + 256 * 151936 * 2


@pytest.mark.gpu
def test_real_kineto_trace_ties_graph_kernels_and_labels(tmp_path):
    """The trace format bench_breakdown relies on: kernels replayed from a CUDA graph tie to their
    launch (correlation), so a GEMM in a graph is counted, and a kernel launched inside 'bd.sample'
    is the sampler's."""
    import json

    import torch
    a = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    a @ w.T
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = a @ w.T
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("bd.forward"):
                graph.replay()
            with torch.profiler.record_function("bd.sample"):
                out.float().argmax(-1)
        torch.cuda.synchronize()
    path = tmp_path / "t.json"
    prof.export_chrome_trace(str(path))
    m = from_chrome_trace(json.loads(path.read_text())["traceEvents"], steps, wall_ms=1.0)
    assert m.group_ms["lm_head"] > 0  # the graph's GEMMs (the longest per step) were seen
    assert m.group_ms["sampler"] > 0 and m.busy_ms > 0


def test_cpu_prefill_rows_add_up_and_floors_count_flops(tmp_path):
    """--prefill on CPU: the prompt's steps are all seen (their tokens sum to it), every layer group
    is measured, the rows add up to the prompt's wall time, and the FLOPs floors equal a direct count
    of the tiny model's matmuls."""
    import bench_breakdown
    from breakdown import floor_flops
    from loader.presets import preset_config
    from model.config import ModelConfig
    out = tmp_path / "bd.json"
    results = bench_breakdown.main(["--model", "tiny", "--device", "cpu", "--batches", "", "--penalties-at", "",
                                    "--prefill", "96", "--out", str(out)])
    assert out.exists() and len(results) == 1
    r = results[0]
    assert r["what"] == "prefill" and r["tokens"] == 96 and sum(r["step_tokens"]) == 96
    rows = {x["group"]: x for x in r["rows"]}
    for g in ("attention", "moe", "dense", "norm_rope"):
        assert rows[g]["ms"] > 0 and (g == "norm_rope" or rows[g]["floor_ms"] > 0), g
    total = sum(x["ms"] for x in r["rows"])
    assert abs(total - r["ms"]) <= 0.05 * r["ms"], (total, r["ms"])
    cfg = ModelConfig.from_dict(preset_config("tiny"))
    H, L, T, k = cfg.hidden_size, cfg.num_hidden_layers, 96, cfg.num_experts_per_tok
    att = sum(2 * 2 * cfg.q_size * (j + 1) for j in range(T)) * L  # QK^T and PV, query j sees j + 1 keys
    moe = sum(2 * T * H * (3 * k * cfg.moe_intermediate_size + cfg.num_experts) for i in range(L) if cfg.is_sparse(i))
    fl = floor_flops(cfg, [T])
    assert fl["attention"] == att and fl["moe"] == moe
