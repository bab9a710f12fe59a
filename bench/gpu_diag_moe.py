"""Fused-MoE diagnosis on one GPU: (1) each path's error against an fp64 reference with no
intermediate rounding, beside torch._grouped_mm's, at every real shape and the token counts the
GPU test uses (max |err| over the row's max |ref|); (2) the GEMV path's tiles at 1 and 2 tokens per
shape, each checked against fp64 and timed in a CUDA graph; (3) the grouped path's tiles at large
token counts against torch._grouped_mm.

    python bench/gpu_diag_moe.py --out /tmp/diag.json"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_decode_layer import copy_bandwidth, timed  # noqa: E402
from model import fused_moe_triton as fm  # noqa: E402
from model.backend import MOE_SMALL_MAX_PAIRS  # noqa: E402
from model.moe import experts_grouped, route  # noqa: E402

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "user-config": (6144, 1024, 128, 16),
          "qwen3-235b-a22b": (4096, 1536, 128, 8)}
SMALL = ((8, 512, 4, 4, 512, 4), (4, 1024, 4, 2, 1024, 4), (4, 1024, 4, 2, 512, 4), (4, 512, 4, 2, 512, 4),
         (8, 1024, 8, 2, 1024, 4), (4, 2048, 8, 2, 512, 4), (2, 1024, 4, 2, 1024, 4), (4, 1024, 4, 4, 512, 4),
         (4, 1024, 8, 2, 1024, 8), (2, 2048, 8, 1, 1024, 4))
LARGE = ((64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 3))


def weights(H, I, E, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.02).cuda().bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * 0.02).cuda().bfloat16()
    gate = (torch.randn(E, H, generator=g) * 0.02).cuda().bfloat16()
    return w13, w2, gate


def exact(x, w13, w2, ids, w):
    """fp64, no intermediate rounding: sum_j w_j * down(silu(gate) * up)."""
    N, k = ids.shape
    I = w2.shape[2]
    out = torch.zeros(N, w2.shape[1], dtype=torch.float64, device=x.device)
    xd = x.double()
    for e in torch.unique(ids).tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        h = xd[t] @ w13[e].double().T
        a = F.silu(h[:, :I]) * h[:, I:]
        out.index_add_(0, t, (a @ w2[e].double().T) * w[t, j].double()[:, None])
    return out


def rel(got, ref):
    scale = ref.abs().amax(-1, keepdim=True)
    return float(((got.double() - ref).abs() / scale).max())


def decode_ops(bw_GBps: float, L: int = 8) -> dict:
    """Each b=1 decode op of the 30b shape alone, graph-timed over L copies of its weights (so L2
    does not hold them), us per copy, beside its bytes at the copy bandwidth: where a layer's time goes."""
    from model.attention_triton import paged_decode
    H, I, E, k, q, kv = 2048, 768, 128, 8, 4096, 512
    mk = lambda *s: [torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(L)]  # noqa: E731
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    o = torch.randn(1, q, device="cuda", dtype=torch.bfloat16)
    qkv, ow, gate = mk(q + 2 * kv, H), mk(H, q), mk(E, H)
    w13, w2 = mk(E, 2 * I, H), mk(E, H, I)
    ids = [torch.randperm(E, device="cuda")[:k].view(1, k) for _ in range(L)]
    w = torch.full((1, k), 1.0 / k, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(64, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.arange(8, device="cuda", dtype=torch.int32).view(1, 8)
    ctx = torch.tensor([128], device="cuda", dtype=torch.int32)
    qd = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    ops = {"qkv_proj": (lambda i: F.linear(x, qkv[i]), (q + 2 * kv) * H * 2),
           "o_proj": (lambda i: F.linear(o, ow[i]), H * q * 2),
           "route_fused": (lambda i: fm.route_fused(x, gate[i], k, True), E * H * 2),
           "experts_small": (lambda i: fm.experts_small(x, w13[i], w2[i], ids[i], w), k * 3 * I * H * 2),
           "paged_decode ctx128": (lambda i: paged_decode(qd, kc, vc, tables, ctx, 0.088, 128), 128 * 2 * kv * 2)}
    out = {}
    for name, (fn, nbytes) in ops.items():
        try:
            us = timed(lambda: [fn(i) for i in range(L)]) * 1e3 / L
            out[name] = {"us": us, "floor_us": nbytes / (bw_GBps * 1e3)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"op {name:22s} {out[name]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    res: dict = {"card": torch.cuda.get_device_name(0), "copy_GBps": copy_bandwidth() / 1e9, "errors": {},
                 "small_tiles": {}, "large_tiles": {}}
    print(f"{res['card']}  copy {res['copy_GBps']:.0f} GB/s", flush=True)
    for name, (H, I, E, k) in SHAPES.items():
        w13, w2, gate = weights(H, I, E, 1)
        S = MOE_SMALL_MAX_PAIRS // k
        for N, same in ((1, False), (2, False), (S, False), (S + 1, False), (64, False), (256, False), (2048, False),
                        (512, True)):
            g = torch.Generator(device="cpu").manual_seed(N)
            x = torch.randn(N, H, generator=g).cuda().bfloat16()
            _, w, ids = route(x, gate, k, True)
            if same:
                ids = torch.arange(k, device="cuda").repeat(N, 1)
            ref = exact(x, w13, w2, ids, w)
            row = {"grouped_mm": rel(experts_grouped(x, w13, w2, ids, w), ref),
                   "large": rel(fm.experts_large(x, w13, w2, ids, w), ref)}
            if N * k <= 4096:
                row["small"] = rel(fm.experts_small(x, w13, w2, ids, w), ref)
            row["small_vs_grouped_mm"] = rel(fm.experts_small(x, w13, w2, ids, w).double(),
                                             experts_grouped(x, w13, w2, ids, w).double()) if N * k <= 4096 else None
            row["large_vs_grouped_mm"] = rel(fm.experts_large(x, w13, w2, ids, w).double(),
                                             experts_grouped(x, w13, w2, ids, w).double())
            key = f"{name} N{N}{' same' if same else ''}"
            res["errors"][key] = row
            print(f"err {key:32s} " + "  ".join(f"{p} {v:.5f}" for p, v in row.items() if v is not None), flush=True)
        for N in (1, 2):
            x = torch.randn(N, H, device="cuda").bfloat16()
            _, w, ids = route(x, gate, k, True)
            ref = exact(x, w13, w2, ids, w)
            sub = {}
            for t in SMALL:
                try:
                    err = rel(fm.experts_small(x, w13, w2, ids, w, tiles=t), ref)
                    us = timed(lambda: fm.experts_small(x, w13, w2, ids, w, tiles=t)) * 1e3
                    sub[str(t)] = {"us": us, "err": err, "pct_hbm": 100 * 2 * torch.unique(ids).numel() * 3 * I * H
                                   / (us / 1e6) / (res["copy_GBps"] * 1e9)}
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result too
                    sub[str(t)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            res["small_tiles"][f"{name} N{N}"] = sub
            best = min((v["us"], t) for t, v in sub.items() if "us" in v)
            print(f"small {name} N{N}: " + ", ".join(f"{t} {v.get('us', float('nan')):.1f}us/{v.get('err', -1):.4f}"
                                                     for t, v in sub.items()) + f"  BEST {best}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    H, I, E, k = SHAPES["qwen3-30b-a3b"]
    w13, w2, gate = weights(H, I, E, 2)
    for N in (2048, 4096, 8192, 16384):
        x = torch.randn(N, H, device="cuda").bfloat16()
        _, w, ids = route(x, gate, k, True)
        want = experts_grouped(x, w13, w2, ids, w).double()
        sub = {"torch_us": timed(lambda: experts_grouped(x, w13, w2, ids, w)) * 1e3}
        for t in LARGE:
            sub[str(t)] = {"us": timed(lambda: fm.experts_large(x, w13, w2, ids, w, tiles=t)) * 1e3,
                           "err_vs_grouped_mm": rel(fm.experts_large(x, w13, w2, ids, w, tiles=t).double(), want)}
        res["large_tiles"][f"N{N}"] = sub
        print(f"large N{N}: torch {sub['torch_us']:.0f}us " + ", ".join(
            f"{t} {v['us']:.0f}us/{v['err_vs_grouped_mm']:.4f}" for t, v in sub.items() if t != "torch_us"), flush=True)
    res["decode_ops_b1"] = decode_ops(res["copy_GBps"])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
