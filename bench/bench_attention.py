"""Time the paged attention kernels at Qwen3-30B-A3B's shape and the other head layouts.

N=32 query heads, K=4 kv heads, D=128, bf16, block size 16 (cases named S128: 128), shuffled block
tables (prefill also at N/K = 48/8 and 64/4). Median of triton.testing.do_bench; decode (ours and
SDPA's) from CUDA graphs of GRAPH_REPS calls, as the engine replays it. Decode reports
GB/s of KV read (sum(ctx) * K * D * 2 tensors * 2 bytes) and that as % of the device copy rate
measured in the same run (bytes read + written by a 2 GiB clone); prefill reports TFLOP/s counting
only the causal work (4 * N * D per visible (query, key) pair) and that as % of the bf16 matmul
rate measured in the same run (torch.matmul 8192^3).

Prefill implementations: "fa3" (model/attention_prefill_fa3.py: TMA tiles where the block holds a
key tile, else gathered; split-KV when the grid underfills the SMs; "splits=1" rows turn the split
off), "fa" (model/attention_prefill_triton.py, the FA2-style paged kernel) and "sdpa"
(model/attention_sdpa.py, the engine's SDPA path: gather the prefix contiguous, then SDPA with a
lower-right causal mask, gather included in the time), "split" (model/attention_split.py: the
prefix with no mask and the chunk's own keys causal through cuDNN's or FlashAttention's kernel,
merged by log-sum-exp, gather included). Peer: torch SDPA on contiguous tensors
where it computes the same thing: fresh causal prefill and decode (one query, no mask).

    python bench/bench_attention.py [--out bench/results/attention_kernels.json] [--sweep]
                                    [--only prefill|decode] [--cases NAME,...]

Prints every row, then a short table (per case: each implementation's default) last. The JSON is
rewritten after each case.
--sweep also times a few tile configurations (prefill, SWEEP_CASES; fa3's each with and without
LAZY, the conditional rescale, and "auto exact": the default tiles without it) and block_n / num_splits
(decode; from 64 sequences also the split kernel's warps and stages).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import attention_prefill_fa3 as fa3  # noqa: E402
from model import attention_prefill_triton as fa  # noqa: E402
from model import attention_triton as at  # noqa: E402
from model.attention_sdpa import prefill_sdpa  # noqa: E402
from model.attention_split import prefill_split  # noqa: E402
from model.batch import AttnBatch  # noqa: E402

N, K, D, S = 32, 4, 128, 16
DT = torch.bfloat16
DEV = torch.device("cuda")
SCALE = D ** -0.5


CASES = [  # (kind, name, a, b)
    ("decode", "decode B=1 ctx=2k", 2048, 1),
    ("decode", "decode B=1 ctx=32k", 32768, 1),
    ("decode", "decode B=1 ctx=90k", 92160, 1),
    ("decode", "decode B=1 ctx=128k", 131072, 1),
    ("decode", "decode B=16 ctx=1k", 1024, 16),  # the serving step's attention (1k prompts)
    ("decode", "decode B=64 ctx=1k", 1024, 64),
    ("decode", "decode B=256 ctx=1k", 1024, 256),
    ("decode", "decode B=16 ctx=4k", 4096, 16),
    ("decode", "decode B=16 ctx=32k", 32768, 16),
    ("decode", "decode B=16 ctx=90k", 92160, 16),
    ("decode", "decode B=16 ctx=128k", 131072, 16),
    ("prefill", "prefill 8k fresh", 8192, 8192),
    ("prefill", "prefill 4k at 8k", 4096, 12288),
    ("prefill", "prefill 4k at 32k", 4096, 36864),
    ("prefill", "prefill 4k at 86k", 4096, 92160),
    ("prefill", "prefill 4k at 128k", 4096, 135168),
    ("prefill", "prefill 216 at 90k", 216, 92376),
    ("prefill 32/4/128", "prefill 8k fresh S128", 8192, 8192),
    ("prefill 32/4/128", "prefill 4k at 8k S128", 4096, 12288),
    ("prefill 32/4/128", "prefill 4k at 32k S128", 4096, 36864),
    ("prefill 32/4/128", "prefill 4k at 86k S128", 4096, 92160),
    ("prefill 32/4/128", "prefill 4k at 128k S128", 4096, 135168),
    ("prefill 32/4/128", "prefill 216 at 90k S128", 216, 92376),
    ("prefill 32/4/64", "prefill 8k at 86k S64", 8192, 96256),
    ("prefill 48/8", "prefill 4k at 86k N48 K8", 4096, 92160),
    ("prefill 64/4/128", "prefill 4k at 86k N64 K4 S128", 4096, 92160),
]
FA_SWEEP = [(256, 64, 16, 3), (256, 64, 16, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3),
            (128, 64, 4, 3), (64, 64, 4, 3)]  # BLOCK_M, BLOCK_N, num_warps, num_stages
FA3_SWEEP = [  # (BLOCK_M, BLOCK_N, warps, stages, WS: warp specialisation)
    (128, 64, 4, 3, 0), (128, 64, 4, 3, 1), (128, 128, 8, 2, 0), (128, 128, 8, 2, 1), (128, 64, 8, 3, 0),
    (128, 64, 4, 4, 0), (256, 64, 16, 3, 0)]


def matmul_tflops() -> float:
    """Measured bf16 dense matmul rate (8192^3), the reference for attention TFLOP/s."""
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    ms = bench(lambda: a @ b)
    return 2 * 8192 ** 3 / ms / 1e9


def copy_gbps() -> float:
    """Measured device copy rate, GB/s of bytes read plus written (a 2 GiB bf16 clone), the
    reference for decode's KV read rate."""
    a = torch.empty(2 ** 30, device=DEV, dtype=DT)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / ms / 1e6


def make(qlens: list[int], ctxs: list[int], seed: int = 0, N: int = N, K: int = K, S: int = S,
         pool_blocks: int = 0):
    """q [T, N, D], caches [P, S, K, D] with a shuffled block table per sequence, metadata. P: the
    blocks the sequences need, or pool_blocks when larger (their blocks then drawn from all of it,
    as from the engine's KV pool)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nblk = [triton.cdiv(c, S) for c in ctxs]
    P = max(sum(nblk), pool_blocks)
    k_cache = torch.randn(P, S, K, D, device=DEV, dtype=DT, generator=g)
    v_cache = torch.randn(P, S, K, D, device=DEV, dtype=DT, generator=g)
    perm = torch.randperm(P, device=DEV, generator=g).to(torch.int32)
    M = max(nblk)
    tables = torch.zeros(len(ctxs), M, dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[used:used + n]
        used += n
    q = torch.randn(sum(qlens), N, D, device=DEV, dtype=DT, generator=g)
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cl = torch.tensor(ctxs, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, tables, qs, cl


def contiguous_kv(k_cache, v_cache, table_M, ctx, kv_heads=K, block=S):
    """[1, K, ctx, D] contiguous copies of one sequence's K and V (the SDPA peer's inputs)."""
    def one(c):
        return c[table_M[:triton.cdiv(ctx, block)].long()].reshape(-1, kv_heads, D)[:ctx].transpose(0, 1)[None]
    return one(k_cache).contiguous(), one(v_cache).contiguous()


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE,
                                                            enable_gqa=True)


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


GRAPH_REPS = 10  # decode calls per CUDA graph replay


def bench_graph(fn) -> float:
    """ms per call of fn from replays of a CUDA graph holding GRAPH_REPS calls: as the engine runs
    decode (in its decode graphs), with the host's launch and allocation cost out of the time (an
    eager batch-1 call is shorter on the GPU than on the host)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_REPS):
            fn()
    return bench(g.replay) / GRAPH_REPS


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def decode_case(name, ctxs, rows, sweep, copy, block=64, pool_gib=0.0):
    """block: the pool's block size (the engine's default); pool_gib: each of K and V a pool of this
    size, the sequences' blocks drawn from all of it (0: just the blocks they need)."""
    B = len(ctxs)
    q, kc, vc, bt, _, cl = make([1] * B, ctxs, S=block, pool_blocks=int(pool_gib * 2 ** 30 / (block * K * D * 2)))
    gbytes = sum(ctxs) * K * D * 2 * 2 / 1e9
    splits = at.choose_num_splits(B, K, max(ctxs), DEV)
    variants = [dict(num_splits=None)]
    if sweep:
        variants += [dict(num_splits=s, block_n=bn) for s in sorted({1, max(1, splits // 2), splits,
                     min(256, splits * 2)}) for bn in (32, 64, 128)]
        if B >= 64:  # many sequences: the split kernel's warps and stages at the chosen splits
            variants += [dict(num_splits=splits, block_n=bn, launch=(w, st)) for bn in (64, 128)
                         for w in (4, 8) for st in (2, 3, 4) if (w, st) != (4, 3)]
    out = torch.empty_like(q)
    for kw in variants:
        def fn(kw=kw):
            return at.paged_decode(q, kc, vc, bt, cl, SCALE, max_context=max(ctxs), out=out, **kw)
        try:
            ms = bench_graph(fn)
        except Exception as e:  # a sweep config may not fit shared memory on this card
            if type(e).__name__ != "OutOfResources":
                raise
            print(f"    decode {kw}: does not fit ({str(e)[:80]})", flush=True)
            continue
        tag = "auto" if kw["num_splits"] is None else f"splits={kw['num_splits']} block_n={kw['block_n']}" + (
            f" warps={kw['launch'][0]} stages={kw['launch'][1]}" if "launch" in kw else "")
        rows.append(dict(case=name, impl="triton", variant=tag, block=block, pool_blocks=kc.shape[0], ms=ms,
                         GBps=gbytes / ms * 1e3,
                         num_splits=kw["num_splits"] or splits, pct_of_copy=100 * gbytes / ms * 1e3 / copy))
        print(f"    decode {tag}: {ms:.4f} ms {gbytes / ms * 1e3:.0f} GB/s", flush=True)
    if len(set(ctxs)) == 1:  # peer: SDPA on contiguous [B, K, ctx, D] K/V, one query, no mask
        kvs = [contiguous_kv(kc, vc, bt[b], ctxs[b], block=block) for b in range(B)]
        k1, v1 = torch.cat([x[0] for x in kvs]), torch.cat([x[1] for x in kvs])
        qq = q[:, :, None, :]  # [B, N, 1, D]
        try:
            err = rel_err(out, sdpa(qq, k1, v1, False)[:, :, 0])  # out: the last variant's result
            ms = bench_graph(lambda: sdpa(qq, k1, v1, False))
            rows.append(dict(case=name, impl="sdpa (contiguous)", variant="", ms=ms,
                             GBps=gbytes / ms * 1e3, rel_err_triton_vs_sdpa=err))
        except RuntimeError as e:  # e.g. no kernel for this layout: note it, go on
            rows.append(dict(case=name, impl="sdpa (contiguous)", variant="", error=str(e)[:200]))
        del kvs, k1, v1


def prefill_case(name, qlen, ctx, rows, sweep, n_heads=N, kv_heads=K, mm_tflops=None, block=S):
    q, kc, vc, bt, qs, cl = make([qlen], [ctx], N=n_heads, K=kv_heads, S=block)
    tflop = 4 * n_heads * D * sum(ctx - qlen + i + 1 for i in range(qlen)) / 1e12
    shape = f"N{n_heads} K{kv_heads} S{block}"

    def add(impl, variant, fn, ref=None):
        try:
            ms = bench(fn)
        except Exception as e:  # a sweep config may not fit shared memory on this card
            rows.append(dict(case=name, shape=shape, impl=impl, variant=variant, error=repr(e)[:200]))
            print(f"    {impl} {variant}: error {repr(e)[:300]}", flush=True)
            return None
        r = dict(case=name, shape=shape, impl=impl, variant=variant, qlen=qlen, offset=ctx - qlen,
                 ms=ms, TFLOPs=tflop / ms * 1e3)
        if mm_tflops:
            r["pct_of_matmul"] = 100 * r["TFLOPs"] / mm_tflops
        if ref is not None:
            r["rel_err_vs_sdpa"] = rel_err(fn(), ref)
        rows.append(r)
        print(f"    {impl} {variant}: {ms:.3f} ms {r['TFLOPs']:.0f} TFLOP/s", flush=True)
        return ms

    none = torch.empty(0, dtype=torch.int64, device=bt.device)  # positions, slots, logits rows: unused
    batch = AttnBatch(none, none, bt, qs, cl, none, query_lens=[qlen], context_lens=[ctx])
    ref = prefill_sdpa(q, kc, vc, batch, SCALE, None)
    add("sdpa", "engine path (gather + lower-right mask)", lambda: prefill_sdpa(q, kc, vc, batch, SCALE, None))
    out = torch.empty_like(q)
    configs = [None]
    if sweep:
        configs += [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in FA_SWEEP]
    for cfg in configs:
        tag = "default" if cfg is None else "M{BLOCK_M} N{BLOCK_N} warps{num_warps} stages{num_stages}".format(**cfg)
        add("fa", tag, lambda cfg=cfg: fa.paged_prefill_fa(q, kc, vc, bt, qs, cl, SCALE, qlen, out=out, config=cfg),
            ref)
    variants = [("auto", None, None)]
    if fa3.choose_kv_splits(triton.cdiv(qlen, fa3.TILES_TMA["BLOCK_M"] // (n_heads // kv_heads)) * kv_heads,
                            ctx - qlen, torch.cuda.get_device_properties(DEV).multi_processor_count) > 1:
        variants.append(("splits=1", None, 1))
    if sweep:  # each tile config exact and with the lazy rescale (LAZY, TMA tiles only)
        variants.append(("auto exact", dict(LAZY=False), None))
        variants += [("M{} N{} warps{} stages{} ws{}".format(*c) + (" lazy" if lazy else ""),
                      dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3], WS=bool(c[4]), LAZY=lazy),
                      None)
                     for c in FA3_SWEEP for lazy in (False, True)]
    tma = "tma" if fa3.tma_ok(q, kc, vc, fa3.TILES_TMA["BLOCK_N"]) else "gather"
    for tag, cfg, splits in variants:
        add("fa3", f"{tma} {tag}", lambda cfg=cfg, splits=splits: fa3.paged_prefill_fa3(
            q, kc, vc, bt, qs, cl, SCALE, qlen, ctx - qlen, out=out, config=cfg, num_splits=splits), ref)
    for backend in ("cudnn", "flash"):  # prefix without a mask + own keys causal, merged by lse
        add("split", backend, lambda backend=backend: prefill_split(q, kc, vc, batch, SCALE, None, backend), ref)
    if qlen == ctx:  # fresh prefill: SDPA causal on contiguous tensors is the same maths
        k1, v1 = contiguous_kv(kc, vc, bt[0], ctx, kv_heads, block)
        qq = q.transpose(0, 1)[None].contiguous()  # [1, N, T, D]
        add("sdpa (contiguous, is_causal)", "", lambda: sdpa(qq, k1, v1, True))


SWEEP_CASES = ("prefill 4k at 86k S128", "prefill 8k at 86k S64")  # the tile sweep runs on these only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/attention_kernels.json")
    ap.add_argument("--sweep", action="store_true", help="also time other tile configs / splits")
    ap.add_argument("--only", choices=("prefill", "decode"), default=None)
    ap.add_argument("--decode-block-size", type=int, default=64, help="block size of the decode cases' pool")
    ap.add_argument("--decode-pool-gib", type=float, default=0.0,
                    help="the decode cases' K and V pools this size each, blocks drawn from all of it "
                         "(as the engine's pool)")
    ap.add_argument("--cases", default=None, help="comma-separated case names to run")
    ap.add_argument("--configs", default=None,
                    help="sweep these fa tiles instead, e.g. '256,64,16,2;128,128,8,3' (M,N,warps,stages)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if args.configs:
        FA_SWEEP[:] = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    rows: list[dict] = []
    mm = matmul_tflops()
    cp = copy_gbps()
    print(f"bf16 matmul 8192^3: {mm:.0f} TFLOP/s; device copy {cp:.0f} GB/s", flush=True)
    cases = CASES
    if args.cases:  # in the order given
        by_name = {c[1]: c for c in CASES}
        cases = [by_name[n.strip()] for n in args.cases.split(",")]
    for kind, name, a, b in cases:
        if args.only and not kind.startswith(args.only):
            continue
        print(f"... {name}", flush=True)
        if kind == "decode":
            # a: context, b: batch
            decode_case(name, [a] * b, rows, args.sweep, cp, args.decode_block_size, args.decode_pool_gib)
        else:  # a: chunk length, b: context after it; "prefill N/K[/S]" names heads and block size
            nks = [int(x) for x in kind.split()[1].split("/")] if " " in kind else [N, K]
            prefill_case(name, a, b, rows, args.sweep and name in SWEEP_CASES, nks[0], nks[1], mm,
                         nks[2] if len(nks) > 2 else S)
        torch.cuda.empty_cache()
        write(args.out, rows, mm, cp)  # after each case: a run cut short keeps what it measured

    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"matmul {mm:.0f} TFLOP/s")
    print(f"{'case':<26} {'impl':<12} {'variant':<40} {'ms':>9} {'GB/s':>6} {'TFLOP/s':>8} {'%mm/%copy':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<26} {r['impl'][:12]:<12} {r['variant'][:40]:<40} error: {r['error'][:60]}")
            continue
        gb = f"{r['GBps']:.0f}" if "GBps" in r else ""
        tf = f"{r['TFLOPs']:.1f}" if "TFLOPs" in r else ""
        pct = r.get("pct_of_matmul", r.get("pct_of_copy"))
        pct = f"{pct:.0f}" if pct is not None else ""
        err = r.get("rel_err_triton_vs_sdpa", r.get("rel_err_vs_sdpa"))
        extra = f"  (rel err vs sdpa {err:.1e})" if err is not None else ""
        print(f"{r['case']:<26} {r['impl'][:12]:<12} {r['variant'][:40]:<40} {r['ms']:>9.4f} {gb:>6} {tf:>8} "
              f"{pct:>5}" + extra)

    write(args.out, rows, mm, cp)
    print(f"\nwrote {args.out}")
    summary(rows, mm, cp)


def write(path: str, rows: list[dict], mm: float, cp: float) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        card=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        torch=torch.__version__, triton=triton.__version__, matmul_tflops=mm,
        copy_GBps=cp, shape=dict(N=N, K=K, D=D, block_size=S, dtype="bfloat16"), results=rows), indent=1))


def summary(rows: list[dict], mm: float, cp: float) -> None:
    """The short table: per case, each implementation's default (prefill: TFLOP/s and % of the
    matmul rate; decode: GB/s of KV and % of the copy rate)."""
    print(f"\nsummary (matmul {mm:.0f} TFLOP/s, copy {cp:.0f} GB/s)")
    cols = ("sdpa", "fa", "fa3", "fa3 1split", "fa3 exact", "split cudnn", "split flash")
    print(f"{'case':<30} " + " ".join(f"{c if c != 'fa' else 'fa/decode':>11}" for c in cols))
    cases: dict[str, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        key = {"sdpa": "sdpa", "sdpa (contiguous)": "sdpa", "fa": "fa" if r["variant"] == "default" else None,
               "triton": "fa" if r["variant"] == "auto" else None}.get(r["impl"])  # triton: decode
        if r["impl"] == "fa3":
            v = r["variant"]
            key = ("fa3" if v.endswith(" auto") else "fa3 1split" if v.endswith("splits=1")
                   else "fa3 exact" if v.endswith(" auto exact") else None)
        if r["impl"] == "split":
            key = f"split {r['variant']}"
        if key:
            rate = f"{r['TFLOPs']:.0f}T" if "TFLOPs" in r else f"{r['GBps']:.0f}G"
            pct = r.get("pct_of_matmul", r.get("pct_of_copy", 0))
            cases.setdefault(r["case"], {})[key] = f"{rate} {pct:.0f}%"
    for case, v in cases.items():
        print(f"{case:<30} " + " ".join(f"{v.get(k, '-'):>11}" for k in cols))


if __name__ == "__main__":
    main()
