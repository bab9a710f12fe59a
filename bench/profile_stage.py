"""Per-layer costs of one stage at the real qwen3-30b-a3b shape on one GPU (random weights, no
checkpoint): prefill with each attention backend, decode eager vs CUDA graph, the expert paths,
and a torch.profiler table of the top kernels. Prints a short table last.

    python bench/profile_stage.py --layers 4 [--out results.json]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.decode_graphs import DecodeGraphs  # noqa: E402
from loader.presets import preset_config, yarn_config  # noqa: E402
from model.batch import AttnBatch  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.moe import experts_grouped, experts_loop, route  # noqa: E402
from model.backend import Backend  # noqa: E402
from model.stage import Stage  # noqa: E402


def bench(fn, reps=10):
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    raw = yarn_config(preset_config("qwen3-30b-a3b"))
    raw["num_hidden_layers"] = a.layers
    cfg = ModelConfig.from_dict(raw)
    dev, dt, bs = torch.device("cuda:0"), torch.bfloat16, 16
    stage = Stage(cfg, 0, a.layers, True, True, dev, dt)
    with torch.no_grad():
        for n, p in stage.named_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    ctx_max = 92160
    nblocks = ctx_max // bs + 64
    stage.allocate_kv(nblocks + 1, bs)
    stage.kv_cache.normal_(0, 1)
    res, L = {}, a.layers
    table = list(range(nblocks))

    def prefill_fn(T, start):
        ids = torch.randint(0, cfg.vocab_size, (T,), device=dev)
        batch = AttnBatch.build([T], [start + T], [table[:-(-(start + T) // bs)]], bs, [True], dev)
        return lambda: stage(ids, batch)

    for on in (False, True):
        tag = "fused" if on else "unfused"
        for backend in ("sdpa", "triton") if on else ("sdpa",):
            stage.backend = Backend(backend, "triton" if on else "torch", on)
            for T, start in ((2048, 0), (8192, 0), (4096, 86016)):
                ms = bench(prefill_fn(T, start), reps=5)
                res[f"prefill {tag} {backend} {T}@{start}"] = ms
                print(f"prefill {tag:7s} {backend:6s} T={T:5d} at {start:5d}: {ms:8.2f} ms "
                      f"({ms / L:.2f} ms/layer, {T / ms * 1e3:.0f} tok/s)", flush=True)
        stage.backend = Backend("sdpa", "triton" if on else "torch", on)
        graphs = DecodeGraphs(stage, bs, ctx_max, 32, nblocks)
        for B, ctx in ((1, 128), (16, 128), (1, 90000)):
            ids = torch.randint(0, cfg.vocab_size, (B,), device=dev)
            tables = [table[i * 8:i * 8 + -(-ctx // bs)] if ctx < 1000 else table[:-(-ctx // bs)] for i in range(B)]
            batch = AttnBatch.build([1] * B, [ctx] * B, tables, bs, [True] * B, dev)
            eager = bench(lambda: stage(ids, batch))
            graph = bench(lambda: graphs.run(ids, [ctx] * B, tables))
            with torch.no_grad():
                d = (stage(ids, batch) - graphs.run(ids, [ctx] * B, tables)).abs().max().item()
            res[f"decode {tag} eager b{B} ctx{ctx}"], res[f"decode {tag} graph b{B} ctx{ctx}"] = eager, graph
            print(f"decode {tag:7s} b={B:2d} ctx={ctx:6d}: eager {eager:7.3f} ms, graph {graph:7.3f} ms "
                  f"({graph / L:.3f} ms/layer); max |eager - graph| logits {d:.3g}", flush=True)
        del graphs
    E, I, H, k = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_experts_per_tok
    mlp = stage.layers["0"].mlp
    for N in (1, 16, 8192):
        x = torch.randn(N, H, device=dev, dtype=dt)
        _, w, ids = route(x, mlp.gate.weight, k, True)
        g = bench(lambda: experts_grouped(x, mlp.experts.gate_up_proj, mlp.experts.down_proj, ids, w))
        lp = bench(lambda: experts_loop(x, mlp.experts.gate_up_proj, mlp.experts.down_proj, ids, w))
        res[f"experts grouped N{N}"], res[f"experts loop N{N}"] = g, lp
        print(f"experts N={N:5d}: grouped {g:7.3f} ms, loop {lp:7.3f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile
    fn = prefill_fn(8192, 0)
    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    if a.out:
        Path(a.out).write_text(json.dumps({"card": torch.cuda.get_device_name(0), "layers": L, "ms": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
