"""The MoE of one layer at prefill and decode sizes on one GPU (dummy weights, a real shape): each
piece of model/fused_moe_triton.experts_large timed on its own with CUDA events, beside its floor.

- routing (router GEMM + top-k kernel);
- the align: align_by_expert's torch ops (the reference) and moe_align.align_wide (the engine's);
- the two grouped GEMMs (grouped_gemms; weight tiles by pointer loads and by TMA), in TFLOP/s of the real pairs' FLOPs (6 * P * H * I, the
  padding rows counted as waste) and as % of the bf16 matmul rate measured in the same run; with
  --sweep every tile in TILES (N-major grid), both loads; also as % of the copy rate at the bytes
  of the experts the pairs touch (the floor at decode sizes, where a GEMM streams weights); below
  the 64-row tiles the sweep takes DECODE_TILES at the engine's row tile (M-major, as the engine);
- cuBLAS's grouped GEMM (torch._grouped_mm) on the same pairs, rows gathered by expert beforehand
  (outside the timing): both GEMMs with torch's silu * up between them, and the two GEMMs alone;
- the k-term sum: torch's `sum(dim=1, dtype=float32).to(bf16)` (the reference) and combine_k (the
  engine's), as % of the copy rate (P * H reads + N * H writes);
- the whole experts_large.

    python bench/bench_moe_prefill.py --tokens 1024,2048,4096,8192,16384 --sweep --out bench/results/x.json
    python bench/bench_moe_prefill.py --tokens 16,64,256 --sweep       (decode steps' sizes)

Routing is the dummy router's (near uniform over the experts, so every expert holds P / E rows)."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_decode_layer import copy_bandwidth, timed  # noqa: E402
from loader.presets import preset_config  # noqa: E402
from model import fused_moe_triton as fm  # noqa: E402
from model import moe_align as ma  # noqa: E402
from model.backend import MOE_N_MAJOR_MIN_BM  # noqa: E402

# (BM, BN, BK, warps, stages): grouped_tiles' prefill tile first
TILES = ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 2), (128, 256, 64, 8, 2), (128, 128, 32, 4, 4),
         (128, 64, 64, 4, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 3))
# (BN, BK, warps, stages) at decode sizes, the row tile (BM) the engine's; the defaults (grouped_tiles) among them
DECODE_TILES = ((128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3),
                (32, 128, 4, 3), (64, 256, 4, 2), (128, 64, 8, 4))


def matmul_rate() -> float:
    """FLOP/s of an 8192^3 bf16 matmul."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * 8192 ** 3 / (timed(lambda: a @ b, graph=False) / 1e3)


def layer(preset: str, N: int, seed: int):
    cfg = preset_config(preset)
    H, I, E, k = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=dev) * 0.02).to(dt)
    w2 = (torch.randn(E, H, I, generator=g, device=dev) * 0.02).to(dt)
    gate = (torch.randn(E, H, generator=g, device=dev) * 0.02).to(dt)
    x = torch.randn(N, H, generator=g, device=dev).to(dt)
    return x, w13, w2, gate, (H, I, E, k)


def sweep_one(fn) -> float | None:
    """timed(fn), or None where the tile does not fit the card (Triton's OutOfResources: shared memory)."""
    try:
        return timed(fn)
    except Exception as e:  # triton.runtime.errors.OutOfResources, named only where Triton is importable
        if type(e).__name__ != "OutOfResources":
            raise
        return None


def one_count(preset: str, N: int, sweep: bool, mm: float, bw: float) -> dict:
    x, w13, w2, gate, (H, I, E, k) = layer(preset, N, N)
    P = N * k
    w, ids = fm.route_fused(x, gate, k, True)
    tiles = fm.grouped_tiles(P, E, x.device)
    BM = tiles[0]
    nm = MOE_N_MAJOR_MIN_BM
    row = {"tokens": N, "pairs": P, "tiles": list(tiles), "n_major_min_bm": nm,
           "route_ms": timed(lambda: fm.route_fused(x, gate, k, True)),
           "align_torch_ms": timed(lambda: ma.align_by_expert(ids, E, BM))}
    row["align_wide_ms"] = timed(lambda: ma.align_wide(ids, E, BM))
    pairs, bexp = ma.align_by_expert(ids, E, BM)
    flops = 6 * P * H * I
    # the floor in bytes: each touched expert's three matrices once, x read and y written per pair
    wbytes = ids.unique().numel() * 3 * H * I * 2 + 2 * P * H * 2
    pct_bw = lambda ms: 100 * wbytes / (ms / 1e3) / bw  # noqa: E731
    gemm = timed(lambda: fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, nm))
    row.update(gemm_ms=gemm, gemm_tflops=flops / gemm / 1e9, gemm_pct_mm=100 * flops / (gemm / 1e3) / mm,
               gemm_bytes=wbytes, gemm_pct_bw=pct_bw(gemm))
    for load, tma in (("pointer", False), ("tma", True)):  # the engine's default is one of these
        ms = timed(lambda: fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, nm, tma=tma))
        row[f"gemm_{load}_ms"], row[f"gemm_{load}_pct_mm"] = ms, 100 * flops / (ms / 1e3) / mm
        row[f"gemm_{load}_pct_bw"] = pct_bw(ms)
    if hasattr(torch, "_grouped_mm"):  # the library's grouped GEMM, its gather and offsets outside the timing
        order = torch.argsort(ids.reshape(-1), stable=True)
        xs = x[order // k]
        offs = torch.cumsum(torch.bincount(ids.reshape(-1), minlength=E), 0).to(torch.int32)
        w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)
        act = torch.randn(P, I, device=x.device, dtype=x.dtype)

        def cublas(both: bool):
            h = torch._grouped_mm(xs, w13t, offs=offs)
            a = torch.nn.functional.silu(h[:, :I]) * h[:, I:] if both else act
            return torch._grouped_mm(a, w2t, offs=offs)
        for name, both in (("gemm_cublas", True), ("gemm_cublas_only", False)):
            try:
                ms = timed(lambda: cublas(both))
            except RuntimeError as e:  # a torch build whose grouped GEMM lacks this card or layout
                print(f"{name}: {e}", file=sys.stderr)
                continue
            row[f"{name}_ms"], row[f"{name}_pct_mm"] = ms, 100 * flops / (ms / 1e3) / mm
    if sweep:
        sweep_tiles = TILES if BM >= 64 else tuple((BM, *t) for t in DECODE_TILES)
        aligned = {bm: ma.align_by_expert(ids, E, bm) for bm in {t[0] for t in sweep_tiles}}  # outside the timing
        row["gemm_sweep_ms"] = {f"{t} tma={int(tma)}": sweep_one(lambda: fm.grouped_gemms(
            x, w13, w2, *aligned[t[0]], w, t, t[0] if BM >= 64 else 0, tma=tma))
            for t in sweep_tiles for tma in (False, True)}
    y = fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, nm).view(N, k, H)
    cbytes = (P + N) * H * 2
    for name, fn in (("combine_torch", lambda: y.sum(dim=1, dtype=torch.float32).to(y.dtype)),
                     ("combine_triton", lambda: fm.combine_k(y))):
        ms = timed(fn)
        row[f"{name}_ms"], row[f"{name}_pct_bw"] = ms, 100 * cbytes / (ms / 1e3) / bw
    row["experts_large_ms"] = timed(lambda: fm.experts_large(x, w13, w2, ids, w, n_major_min_bm=nm))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384", help="comma-separated token counts")
    ap.add_argument("--sweep", action="store_true", help="time every tile in TILES at each count")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    counts = [int(t) for t in a.tokens.split(",") if t]
    if not counts or min(counts) < 1:
        raise SystemExit(f"error: --tokens must be positive integers, got {a.tokens!r}")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_moe_prefill needs a CUDA device")
    mm, bw = matmul_rate(), copy_bandwidth()
    rows = []
    for N in counts:
        rows.append(one_count(a.preset, N, a.sweep, mm, bw))
        print(json.dumps(rows[-1]), flush=True)
    res = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "preset": a.preset,
           "matmul_tflops": mm / 1e12, "copy_GBps": bw / 1e9, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\n{res['gpu']}: bf16 matmul {mm / 1e12:.0f} TFLOP/s, copy {bw / 1e9:.0f} GB/s, {a.preset}, one layer (ms)")
    print("tokens | route | align torch | align wide | GEMMs (% mm, % copy rate at the touched experts' bytes)"
          " | pointer loads | TMA loads | best sweep | cuBLAS grouped + silu / GEMMs alone (% mm)"
          " | sum torch | sum triton (% bw) | whole")
    for r in rows:
        sw = [(k, v) for k, v in r.get("gemm_sweep_ms", {}).items() if v]
        best = min(sw, key=lambda kv: kv[1]) if sw else ("-", 0.0)
        print(f"{r['tokens']} | {r['route_ms']:.3f} | {r['align_torch_ms']:.3f} | {r['align_wide_ms']:.3f}"
              f" | {r['gemm_ms']:.3f} ({r['gemm_pct_mm']:.0f}%, {r['gemm_pct_bw']:.0f}%)"
              f" | {r['gemm_pointer_ms']:.3f} ({r['gemm_pointer_pct_mm']:.0f}%, {r['gemm_pointer_pct_bw']:.0f}%)"
              f" | {r['gemm_tma_ms']:.3f} ({r['gemm_tma_pct_mm']:.0f}%, {r['gemm_tma_pct_bw']:.0f}%)"
              f" | {best[0]} {best[1]:.3f} | {r.get('gemm_cublas_ms', 0):.3f} / {r.get('gemm_cublas_only_ms', 0):.3f}"
              f" ({r.get('gemm_cublas_only_pct_mm', 0):.0f}%) | {r['combine_torch_ms']:.3f}"
              f" | {r['combine_triton_ms']:.3f} ({r['combine_triton_pct_bw']:.0f}%) | {r['experts_large_ms']:.3f}")

if __name__ == "__main__":
    main()
