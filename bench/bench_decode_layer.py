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


def timed(fn, reps=20) -> float:
    """Median ms of fn() over reps, by CUDA events."""
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
    ms = timed(lambda: b.copy_(a), reps=10)
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


def decode_table(cfg, layers: int, bw: float, batches, contexts, out: dict) -> None:
    dev, dt, bs = torch.device("cuda:0"), torch.bfloat16, 16
    stage = fill_dummy(Stage(cfg, 0, layers, False, False, dev, dt))
    max_ctx = max(contexts)
    nblocks = -(-max_ctx // bs) + 1
    stage.allocate_kv(nblocks + 1, bs)
    stage.kv_cache.normal_(0, 1)
    fused = pick_backend(dev)
    before = Backend("sdpa", "torch", False)
    for B in batches:
        x = torch.randn(B, cfg.hidden_size, device=dev, dtype=dt)
        for ctx in contexts:
            # every sequence reads the same blocks: the KV bytes are real, the pool stays small
            table = list(range(-(-ctx // bs)))
            batch = AttnBatch.build([1] * B, [ctx] * B, [table] * B, bs, [True] * B, dev)
            row = {}
            for name, be in (("before", before), ("after", fused)):
                stage.backend = be
                with torch.inference_mode():
                    stage(x, batch)
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        stage(x, batch)
                ms = timed(g.replay)
                us = ms * 1e3 / layers
                row[name] = {"us_per_layer": us, "pct_hbm": 100 * layer_bytes(cfg, B, ctx) / (us / 1e6) / bw}
                del g
            key = f"b{B} ctx{ctx}"
            out[key] = row
            print(f"decode {key:14s} before {row['before']['us_per_layer']:8.1f} us/layer "
                  f"({row['before']['pct_hbm']:5.1f}% HBM)  after {row['after']['us_per_layer']:8.1f} us/layer "
                  f"({row['after']['pct_hbm']:5.1f}% HBM)", flush=True)
    del stage
    torch.cuda.empty_cache()


def moe_paths(cfg, counts, out: dict, bw: float) -> None:
    dev, dt = torch.device("cuda:0"), torch.bfloat16
    H, E, k, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
    gate = torch.randn(E, H, device=dev, dtype=dt) * 0.02
    for N in counts:
        x = torch.randn(N, H, device=dev, dtype=dt)
        _, w, ids = route(x, gate, k, True)
        row = {"torch": timed(lambda: experts_grouped(x, w13, w2, ids, w)),
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
    x = torch.randn(1, H, device=dev, dtype=dt)
    _, w, ids = route(x, gate, k, True)
    sweep = {}
    for t in ((8, 256, 8, 256), (16, 256, 16, 256), (8, 128, 8, 128), (16, 128, 8, 512), (4, 512, 4, 256),
              (32, 128, 16, 128), (8, 512, 4, 512)):
        sweep[str(t)] = timed(lambda: fm.experts_small(x, w13, w2, ids, w, tiles=t)) * 1e3
    out["small_tiles_N1_us"] = sweep
    print("small path tiles at N=1 (BN1, BK1, BN2, BK2): " + ", ".join(f"{t} {v:.1f} us" for t, v in sweep.items()))


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
        res["precompile_s"] = precompile(stage, 2048, 64, 8192)
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
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--contexts", default="128,32768")
    ap.add_argument("--moe-counts", default="1,2,4,8,12,16,24,32,48,64,128,256,512,2048,8192")
    ap.add_argument("--extra-shapes", default="", help="more presets/configs for the b=1 table")
    ap.add_argument("--first-request", choices=("cold", "warm"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-first-request", action="store_true")
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
    moe_paths(cfg, [int(n) for n in a.moe_counts.split(",")], res["moe"], bw)
    decode_table(cfg, a.layers, bw, [int(b) for b in a.batches.split(",")], [int(c) for c in a.contexts.split(",")],
                 res["decode"])
    for shape in filter(None, a.extra_shapes.split(",")):
        sub: dict = {}
        print(f"-- {shape}")
        decode_table(dummy_config(shape), 2, bw, [1], [128], sub)
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
        print(f"| {key} | {row['before']['us_per_layer']:.1f} | {row['before']['pct_hbm']:.0f}% | "
              f"{row['after']['us_per_layer']:.1f} | {row['after']['pct_hbm']:.0f}% |")
    for shape, sub in res["shapes_b1"].items():
        for key, row in sub.items():
            print(f"| {shape} {key} | {row['before']['us_per_layer']:.1f} | {row['before']['pct_hbm']:.0f}% | "
                  f"{row['after']['us_per_layer']:.1f} | {row['after']['pct_hbm']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
