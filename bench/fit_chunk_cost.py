"""Fit the prefill chunk cost model of engine/runtime/chunking.py from measured stage time.

Model, per layer, in ms:  ms(n, p) = c0 + a * n + b * (n * p + n * (n + 1) / 2)
  n tokens in the chunk, p cached tokens before it; c0 per chunk (launches, small-chunk
  inefficiency), a per token (projections, MoE, norms), b per causal (query, key) pair.

--measure (CUDA): times one stage of --layers layers at the real qwen3-30b-a3b shape (dummy
weights, block size --block-size, attention --attention) over a grid of (n, p), fits, and writes timings,
fit and the stage's peak memory beyond weights + pool per chunk to --out. Without --measure it
refits the points of an earlier --out (--from). Prints the coefficients to paste into
engine/runtime/chunking.py, and a short table last.

    python bench/fit_chunk_cost.py --measure --out bench/results/chunk_cost_H100_<date>.json
    python bench/fit_chunk_cost.py --from bench/results/chunk_cost_H100_<date>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NS = (256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
PS = (0, 8192, 24576, 49152, 73728, 98304)


def features(n: float, p: float) -> list[float]:
    return [1.0, n, n * p + n * (n + 1) / 2]


def fit(points: list[dict]) -> dict:
    """Least squares on relative error (each point weighted by 1 / its time)."""
    X = np.array([features(q["n"], q["p"]) for q in points])
    t = np.array([q["ms_per_layer"] for q in points])
    coef, *_ = np.linalg.lstsq(X / t[:, None], np.ones_like(t), rcond=None)
    rel = X @ coef / t - 1
    return dict(c0_ms=float(coef[0]), a_ms_per_token=float(coef[1]), b_ms_per_pair=float(coef[2]),
                rel_rms=float(np.sqrt(np.mean(rel ** 2))), rel_max=float(np.abs(rel).max()),
                worst_point=points[int(np.abs(rel).argmax())])


def measure(layers: int, attention: str, reps: int, preset: str, device: str, ns=NS, ps=PS, bs: int = 64) -> dict:
    import time
    from dataclasses import replace

    import torch

    from loader.dummy import fill_dummy
    from loader.presets import preset_config, yarn_config
    from model.batch import AttnBatch
    from model.config import ModelConfig
    from model.stage import Stage

    raw = yarn_config(preset_config(preset))
    raw["num_hidden_layers"] = layers
    cfg = ModelConfig.from_dict(raw)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    stage = fill_dummy(Stage(cfg, 0, layers, True, False, dev, dt, attention))
    nblocks = (max(ps) + max(ns)) // bs + 1
    stage.allocate_kv(nblocks, bs)
    stage.kv_cache.normal_(0, 1)
    table = torch.randperm(nblocks, generator=torch.Generator().manual_seed(0)).tolist()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(n: int, p: int, attn: str = attention) -> tuple[float, int]:
        stage.backend = replace(stage.backend, attention=attn)
        ids = torch.randint(0, cfg.vocab_size, (n,), device=dev)
        batch = AttnBatch.build([n], [p + n], [table[:-(-(p + n) // bs)]], bs, [False], dev)
        stage(ids, batch)
        sync()
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            stage(ids, batch)
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() - base if cuda else 0
        return sorted(ts)[len(ts) // 2] / layers, peak

    points = []
    for p in ps:
        for n in ns:
            ms, _ = run(n, p)
            points.append(dict(n=n, p=p, ms_per_layer=ms))
            print(f"n={n:5d} p={p:6d}: {ms:8.3f} ms/layer", flush=True)
    compare = []
    for n, p in ((4096, 0), (4096, 32768), (4096, 86016), (8192, 0)) if cuda else ():
        for attn in ("sdpa", attention):
            ms, peak = run(n, p, attn)
            compare.append(dict(n=n, p=p, attention=attn, ms_per_layer=ms, peak_extra_mib=peak / 2**20))
            print(f"{attn:5s} n={n:5d} p={p:6d}: {ms:8.3f} ms/layer, peak beyond weights+pool "
                  f"{peak / 2**20:7.1f} MiB", flush=True)
    return dict(card=torch.cuda.get_device_name(dev) if cuda else "cpu", model=f"{preset} (YaRN), dummy weights",
                layers=layers, attention=attention, block_size=bs, reps=reps, torch=torch.__version__,
                points=points, compare=compare)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--attention", default="fa")
    ap.add_argument("--block-size", type=int, default=64, help="tokens per KV block (the engine's default)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--from", dest="src", default=None)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--small", action="store_true", help="a short grid (a CPU smoke run)")
    a = ap.parse_args()
    if a.measure:
        grid = dict(ns=(64, 128, 256), ps=(0, 512)) if a.small else {}
        res = measure(a.layers, a.attention, a.reps, a.preset, a.device, bs=a.block_size, **grid)
        res["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        res["command"] = " ".join(["python"] + sys.argv)
    elif a.src:
        res = json.loads(Path(a.src).read_text())
    else:
        ap.error("give --measure (on a GPU) or --from a timings JSON")
    res["fit"] = fit(res["points"])
    f = res["fit"]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")
    print(f"\n{res['card']}, {res['layers']} layers, attention {res['attention']}: per layer "
          f"ms = {f['c0_ms']:.4g} + {f['a_ms_per_token']:.4g} * n + {f['b_ms_per_pair']:.4g} * pairs "
          f"(rel rms {f['rel_rms']:.1%}, max {f['rel_max']:.1%})")
    print(f"{'n':>6} {'p':>7} {'ms/layer':>9} {'model':>9}")
    for q in res["points"]:
        pred = float(np.dot(features(q["n"], q["p"]), [f["c0_ms"], f["a_ms_per_token"], f["b_ms_per_pair"]]))
        if q["n"] in (512, 2048, 8192):
            print(f"{q['n']:>6} {q['p']:>7} {q['ms_per_layer']:>9.3f} {pred:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
