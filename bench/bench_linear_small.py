"""The dense projections of a decode step (fused qkv, o_proj, router) at 1 to 8 tokens: cuBLAS
(F.linear) against the small-token Triton GEMV (model/linear_triton.py) at its default tile and a
few others, with and without PDL. Each figure is graph-timed over 8 weight copies called in turn
(so L2 does not hold the weight), in us per call and % of the copy bandwidth measured in the same
run. Chooses model.backend.LINEAR_SMALL_MAX_TOKENS.

    python bench/bench_linear_small.py --preset qwen3-30b-a3b --out bench/results/x.json"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_decode_layer import copy_bandwidth, timed  # noqa: E402
from loader.dummy import dummy_config  # noqa: E402
from model import pdl  # noqa: E402
from model.linear_triton import linear_small, small_linear_tiles  # noqa: E402

COPIES = 8
TILES = ((4, 1024, 4), (2, 1024, 4), (8, 512, 4), (4, 512, 4), (2, 2048, 8), (1, 2048, 4), (4, 2048, 8), (2, 4096, 8))


def per_call_us(fn, ws) -> float:
    return timed(lambda: [fn(w) for w in ws]) * 1e3 / len(ws)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = dummy_config(a.preset)
    H = cfg.hidden_size
    shapes = {"qkv": (cfg.q_size + 2 * cfg.kv_size, H), "o_proj": (H, cfg.q_size), "router": (cfg.num_experts, H)}
    bw = copy_bandwidth()
    card = torch.cuda.get_device_name(0)
    res = {"card": card, "date": datetime.date.today().isoformat(), "preset": a.preset, "copy_GBps": bw / 1e9,
           "rows": {}}
    print(f"{card}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(COPIES)]
        floor = 2 * N * K / bw * 1e6
        for T in (int(t) for t in a.tokens.split(",")):
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, generator=g)
            ref = (x.double() @ ws[0].double().T)
            row = {"floor_us": floor, "cublas": per_call_us(lambda w: F.linear(x, w), ws)}
            default = small_linear_tiles(T, N, K)
            for tiles in dict.fromkeys((default,) + TILES):
                for on in (True, False):
                    pdl.set_enabled(on)
                    y = linear_small(x, ws[0], tiles)
                    err = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
                    row[f"{tiles}{' pdl' if on else ''}"] = per_call_us(lambda w: linear_small(x, w, tiles), ws)
                    row.setdefault("max_rel_err", 0.0)
                    row["max_rel_err"] = max(row["max_rel_err"], err)
            pdl.set_enabled(None)
            row["default_tiles"] = list(default)
            res["rows"][f"{name} T{T}"] = row
            best = min((v, k) for k, v in row.items() if k.startswith("("))
            print(f"{name:7s} T{T}: floor {floor:5.1f} us, cuBLAS {row['cublas']:5.1f}, default "
                  f"{row[f'{default} pdl']:5.1f} (pdl) {row[str(default)]:5.1f}, best {best[0]:5.1f} {best[1]}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
