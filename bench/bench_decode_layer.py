"""Per-layer decode cost on one GPU at a real shape (dummy weights, no checkpoint): us per layer
inside a CUDA graph at batch 1, 8, 64, 256 and contexts 128 and 32k, for the torch reference path
("before") and the default fused kernels ("after"), as % of HBM bandwidth: the bytes one step must
read per layer (attention weights, router, the experts the batch hits, its KV) over the time, over
the device-to-device copy bandwidth measured in the same run. Also the MoE paths by token count
(the small/large switch) and the first-request cost without and with model.warmup.precompile.

    python bench/bench_decode_layer.py --preset qwen3-30b-a3b --out bench/results/x.json"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loader.dummy import dummy_config, fill_dummy  # noqa: E402
from model import fused_moe_triton as fm  # noqa: E402
from model.backend import Backend, pick_backend  # noqa: E402
from model.batch import AttnBatch  # noqa: E402
from model.moe import experts_grouped, route  # noqa: E402
from model.stage import Stage  # noqa: E402


def timed(fn, reps=20, graph=True) -> float:
    """Median ms of fn() over reps, by CUDA events; captured in a CUDA graph first (graph=True), so
    host launch cost is left out as in the decode graph."""
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        fn()
        torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), reps=10, graph=False)
    return 2 * a.numel() / (ms / 1e3)


def layer_bytes(cfg, B: int, ctx: int) -> float:
    """Bytes one decode step must read per layer: weights touched + KV (expected distinct experts
    for B tokens routed uniformly at random, as dummy weights route)."""
    H, E, k, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    attn = (cfg.q_size + 2 * cfg.kv_size) * H + H * cfg.q_size + 2 * H + 2 * cfg.head_dim
    hit = E * (1 - (1 - k / E) ** B)
    experts = hit * 3 * I * H + E * H
    kv = B * ctx * 2 * cfg.kv_size
    return 2 * (attn + experts + kv)


def decode_table(cfg, layers: int, bw: float, batches, contexts, out: dict, profile: bool = False,
                 ablate: bool = False) -> None:
    """ablate: also the default kernels without PDL, and with cuBLAS for the dense projections."""
    from dataclasses import replace
    from model import pdl
    dev, dt, bs = torch.device("cuda:0"), torch.bfloat16, 16
    stage = fill_dummy(Stage(cfg, 0, layers, False, False, dev, dt))
    per_seq = -(-max(contexts) // bs)
    pool = max(batches) * per_seq + 1
    if pool * stage.kv_bytes_per_block(bs) > 40 * 2**30:  # then sequences share blocks (L2 may help)
        pool = int(40 * 2**30 // stage.kv_bytes_per_block(bs))
    stage.allocate_kv(pool, bs)
    stage.kv_cache.normal_(0, 1)
    fused = pick_backend(dev)
    before = Backend("sdpa", "torch", False)
    variants = {"before": (before, None), "after": (fused, None)}
    if ablate:
        variants["after, no PDL"] = (fused, False)
        variants["after, PDL off, cuBLAS dense"] = (replace(fused, linear_small_max=0), False)
        variants["after, cuBLAS dense"] = (replace(fused, linear_small_max=0), None)
    for B in batches:
        x = torch.randn(B, cfg.hidden_size, device=dev, dtype=dt)
        for ctx in contexts:
            n = -(-ctx // bs)
            tables = [[(i * n + j) % pool for j in range(n)] for i in range(B)]  # distinct blocks
            batch = AttnBatch.build([1] * B, [ctx] * B, tables, bs, [True] * B, dev)
            # as in the engine's decode graphs, captured once at max_model_len (engine/runtime/decode_graphs.py):
            # the split count follows that bound, each step's context sets how many splits hold keys
            batch.max_context = max(ctx, cfg.max_position_embeddings)
            row = {}
            for name, (be, on) in variants.items():
                stage.backend = be
                pdl.set_enabled(on)
                with torch.inference_mode():
                    ms = timed(lambda: stage(x, batch))
                pdl.set_enabled(None)
                us = ms * 1e3 / layers
                row[name] = {"us_per_layer": us, "pct_hbm": 100 * layer_bytes(cfg, B, ctx) / (us / 1e6) / bw}
            key = f"b{B} ctx{ctx}"
            out[key] = row
            print(f"decode {key:14s} before {row['before']['us_per_layer']:8.1f} us/layer "
                  f"({row['before']['pct_hbm']:5.1f}% HBM)  after {row['after']['us_per_layer']:8.1f} us/layer "
                  f"({row['after']['pct_hbm']:5.1f}% HBM)"
                  + "".join(f"  {k} {v['us_per_layer']:.1f}" for k, v in row.items() if k not in ("before", "after")),
                  flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof_ctx
        B = 1
        x = torch.randn(B, cfg.hidden_size, device=dev, dtype=dt)
        batch = AttnBatch.build([1], [128], [list(range(8))], bs, [True], dev)
        batch.max_context = cfg.max_position_embeddings  # as the engine's graphs (above)
        stage.backend = fused
        with torch.inference_mode():
            stage(x, batch)
            torch.cuda.synchronize()
            with prof_ctx(activities=[ProfilerActivity.CUDA]) as p:
                stage(x, batch)
                torch.cuda.synchronize()
        # per kernel: its total over the step / layers = us per layer; calls per layer (a stage's first
        # layer has a plain norm where the others add + norm, so counts need not divide evenly).
        # (Until 2026-11-28's fifth session this divided by layers twice: the kernel figures recorded
        # before then are per layer / layers, half the truth at the default 2 layers.)
        rows = sorted(((e.key, e.device_time_total / layers, e.count / layers) for e in p.key_averages()
                       if e.device_time_total > 0), key=lambda r: -r[1])
        out["kernels_b1_after_us_per_layer"] = {k: us for k, us, n in rows}
        out["kernels_b1_after_calls_per_layer"] = {k: n for k, us, n in rows}
        print(f"kernels of one b=1 decode step, after (us per layer; their sum {sum(r[1] for r in rows):.1f}):")
        for k, us, n in rows[:14]:
            print(f"  {us:7.1f}  x{n:.2f}  {k[:90]}")
    del stage
    torch.cuda.empty_cache()


SMALL_TILES = ((8, 512, 4, 4, 512, 4), (4, 512, 4, 4, 512, 4), (8, 256, 4, 8, 256, 4), (16, 256, 4, 8, 256, 4),
               (8, 1024, 8, 4, 512, 4), (4, 1024, 4, 2, 1024, 4), (16, 512, 8, 8, 512, 8), (8, 512, 2, 4, 256, 2),
               (4, 256, 2, 2, 512, 2), (2, 1024, 4, 2, 256, 1))
LARGE_TILES = ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
               (64, 64, 128, 4, 4))


def moe_paths(cfg, counts, out: dict, bw: float, sweep: bool = True) -> None:
    dev, dt = torch.device("cuda:0"), torch.bfloat16
    H, E, k, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
    gate = torch.randn(E, H, device=dev, dtype=dt) * 0.02
    for N in counts:
        x = torch.randn(N, H, device=dev, dtype=dt)
        _, w, ids = route(x, gate, k, True)
        row = {"torch": timed(lambda: experts_grouped(x, w13, w2, ids, w)),  # graph-timed, all capturable
               "large": timed(lambda: fm.experts_large(x, w13, w2, ids, w))}
        if N <= 256:
            row["small"] = timed(lambda: fm.experts_small(x, w13, w2, ids, w))
        hit = torch.unique(ids).numel()
        row["route_torch"] = timed(lambda: route(x, gate, k, True))
        row["route_fused"] = timed(lambda: fm.route_fused(x, gate, k, True))
        row["pct_hbm_best"] = 100 * 2 * hit * 3 * I * H / (min(row[p] for p in ("torch", "large", "small") if p in row) / 1e3) / bw
        out[f"N{N}"] = row
        print(f"moe N={N:5d} (hit {hit:3d}): " + "  ".join(f"{p} {v * 1e3:8.1f} us" for p, v in row.items()
                                                        if p != "pct_hbm_best") + f"  best {row['pct_hbm_best']:.0f}% HBM", flush=True)
    if not sweep:
        return
    for N, configs in ((1, SMALL_TILES), (8, SMALL_TILES[:5])):
        x = torch.randn(N, H, device=dev, dtype=dt)
        _, w, ids = route(x, gate, k, True)
        res = {str(t): timed(lambda: fm.experts_small(x, w13, w2, ids, w, tiles=t)) * 1e3 for t in configs}
        out[f"small_tiles_N{N}_us"] = res
        print(f"small path at N={N} (BN1, BK1, warps1, BN2, BK2, warps2): "
              + ", ".join(f"{t} {v:.1f}" for t, v in res.items()), flush=True)
    for N in (256, 2048, 8192):
        x = torch.randn(N, H, device=dev, dtype=dt)
        _, w, ids = route(x, gate, k, True)
        res = {str(t): timed(lambda: fm.experts_large(x, w13, w2, ids, w, tiles=t)) * 1e3 for t in LARGE_TILES}
        out[f"large_tiles_N{N}_us"] = res
        print(f"large path at N={N} (BM, BN, BK, warps, stages): " + ", ".join(f"{t} {v:.1f}" for t, v in res.items()),
              flush=True)


def first_request(preset: str, layers: int, warm: bool) -> dict:
    """In a fresh process (fresh Triton cache): the time of a first prefill (1024) and 64-row
    decode, with or without precompile first."""
    from model.warmup import precompile
    cfg = dummy_config(preset)
    dev = torch.device("cuda:0")
    stage = fill_dummy(Stage(cfg, 0, layers, True, True, dev, torch.bfloat16))
    stage.allocate_kv(4096, 16)
    res = {}
    if warm:
        res["precompile_s"] = precompile(stage, 1024, 64, 2048)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = torch.randint(0, cfg.vocab_size, (1024,), device=dev)
        stage(ids, AttnBatch.build([1024], [1024], [list(range(64))], 16, [True], dev))
        tables = [list(range(64 + 5 * i, 64 + 5 * i + 5)) for i in range(64)]
        stage(ids[:64], AttnBatch.build([1] * 64, [70] * 64, tables, 16, [True] * 64, dev))
    torch.cuda.synchronize()
    res["first_request_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        stage(ids, AttnBatch.build([1024], [1024], [list(range(64))], 16, [True], dev))
        stage(ids[:64], AttnBatch.build([1] * 64, [70] * 64, tables, 16, [True] * 64, dev))
        torch.cuda.synchronize()
    res["second_request_s"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b", help="preset name or config.json path")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="also sweep the MoE kernels' tiles")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--contexts", default="128,32768")
    ap.add_argument("--moe-counts", default="1,2,4,8,12,16,24,32,48,64,128,256,512,2048,8192")
    ap.add_argument("--extra-shapes", default="", help="more presets/configs for the b=1 table")
    ap.add_argument("--first-request", choices=("cold", "warm"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-first-request", action="store_true")
    ap.add_argument("--skip-moe", action="store_true", help="leave out the MoE path sweep")
    ap.add_argument("--ablate", action="store_true", help="also time the kernels without PDL / with cuBLAS dense")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.first_request:
        print(json.dumps(first_request(a.preset, a.layers, a.first_request == "warm")))
        return 0
    cfg = dummy_config(a.preset)
    bw = copy_bandwidth()
    card = torch.cuda.get_device_name(0)
    print(f"{card}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    res: dict = {"card": card, "date": datetime.date.today().isoformat(), "preset": a.preset, "layers": a.layers,
                 "copy_GBps": bw / 1e9, "torch": torch.__version__, "decode": {}, "moe": {}, "shapes_b1": {}}
    if not a.skip_moe:
        moe_paths(cfg, [int(n) for n in a.moe_counts.split(",")], res["moe"], bw, sweep=a.sweep)
    decode_table(cfg, a.layers, bw, [int(b) for b in a.batches.split(",")], [int(c) for c in a.contexts.split(",")],
                 res["decode"], profile=True, ablate=a.ablate)
    for shape in filter(None, a.extra_shapes.split(",")):
        sub: dict = {}
        print(f"-- {shape}")
        decode_table(dummy_config(shape), 2, bw, [1, 8], [128], sub, ablate=a.ablate)
        if a.sweep:
            res["moe_" + shape] = {}
            moe_paths(dummy_config(shape), [1, 8], res["moe_" + shape], bw, sweep=False)
        res["shapes_b1"][shape] = sub
    if not a.skip_first_request:
        for mode in ("cold", "warm"):
            env = dict(os.environ, TRITON_CACHE_DIR=f"/tmp/triton_first_{mode}_{os.getpid()}")
            p = subprocess.run([sys.executable, __file__, "--preset", a.preset, "--layers", "2", "--first-request", mode],
                               env=env, capture_output=True, text=True)
            r = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-2000:]}
            res[f"first_request_{mode}"] = r
            print(f"first request ({mode} Triton cache, 2 layers + embed/head): {r}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print("\n| decode per layer | before us | before %HBM | after us | after %HBM |")
    print("|---|---|---|---|---|")
    for key, row in res["decode"].items():
        if "before" not in row:
            continue
        print(f"| {key} | {row['before']['us_per_layer']:.1f} | {row['before']['pct_hbm']:.0f}% | "
              f"{row['after']['us_per_layer']:.1f} | {row['after']['pct_hbm']:.0f}% |")
    for shape, sub in res["shapes_b1"].items():
        for key, row in sub.items():
            print(f"| {shape} {key} | {row['before']['us_per_layer']:.1f} | {row['before']['pct_hbm']:.0f}% | "
                  f"{row['after']['us_per_layer']:.1f} | {row['after']['pct_hbm']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
