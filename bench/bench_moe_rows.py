"""The MoE's grouped GEMMs at decode sizes, one layer of the 30b shape, CUDA-graph-timed: the align
(model/moe_align) + grouped GEMMs (model/fused_moe_triton.grouped_gemms) against the GEMMs that
find their experts' tokens themselves, every token a row of one tile (model/moe_rows_triton.
rows_gemms), with and without PDL, at row tiles from the batch's power of two up to 64, and its
ranked form (16-row tiles of each expert's pairs). GB/s: the touched experts' weight bytes over the
time.

    python bench/bench_moe_rows.py --tokens 16,24,32,64"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_layer import timed  # noqa: E402
from model import fused_moe_triton as fm  # noqa: E402
from model import moe_rows_triton as mr  # noqa: E402
from model import pdl  # noqa: E402
from model.moe_align import align  # noqa: E402
from model.moe_route_triton import route_fused  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,24,32,64")
    ap.add_argument("--calls", type=int, default=10, help="calls per graph replay")
    args = ap.parse_args()
    H, I, E, k = 2048, 768, 128, 8
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
    gate = torch.randn(E, H, device=dev, dtype=dt) * 0.02
    for N in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(N, H, device=dev, dtype=dt)
        w, ids = route_fused(x, gate, k, True)
        tiles = fm.grouped_tiles(N * k, E, dev)
        pairs, bexp = align(ids, E, tiles[0])
        touched = ids.unique().numel()
        gb = touched * 3 * H * I * 2 / 1e9
        runs = {
            "align": lambda: align(ids, E, tiles[0]),
            "grouped (aligned)": lambda: fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles),
            "align + grouped": lambda: fm.grouped_gemms(x, w13, w2, *align(ids, E, tiles[0]), w, tiles),
        }
        rows = mr.rows_tiles(N, E, k, dev)
        for bm in (16, 32, 64):
            if bm >= rows[0]:
                runs[f"rows, BM {bm}"] = lambda t=(bm, *rows[1:]): mr.rows_gemms(x, w13, w2, ids, w, t)
        runs["ranked"] = lambda: mr.rows_gemms(x, w13, w2, ids, w, tiles, ranked=True)
        want = fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles)
        same = torch.equal(mr.rows_gemms(x, w13, w2, ids, w, (16 if N <= 16 else rows[0], *tiles[1:])), want)
        same_ranked = torch.equal(mr.rows_gemms(x, w13, w2, ids, w, tiles, ranked=True), want)
        print(f"N={N} P={N * k} tiles {tiles}: {touched} experts, {gb:.3f} GB; bits equal: rows {same}, "
              f"ranked {same_ranked}")
        for on in (True, False):
            pdl.set_enabled(on)
            for name, fn in runs.items():
                if name.startswith("align") and not on:
                    continue
                t = timed(lambda: [fn() for _ in range(args.calls)], reps=20) / args.calls
                print(f"  {name:<18} PDL {'on ' if on else 'off'} {t * 1e3:7.1f} us  {gb / (t / 1e3):6.0f} GB/s")
        pdl.set_enabled(None)


if __name__ == "__main__":
    main()
