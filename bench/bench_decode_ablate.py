"""What each part of a decode layer adds to the step, inside decode-layer CUDA graphs: the layer
with one part replaced by a launch-free stand-in (a cached tensor or a view of the right shape;
outputs are wrong, timing only), its marginal cost = full - without. 8 layers of the 30b shape,
dummy weights, block 64, us per layer, min of two alternating rounds. Parts: the decode attention
(split + merge), the dense projections (qkv, o_proj and the router, cuBLAS or the Triton GEMV),
the q/k norm + rope + KV write, the add + RMSNorms, the MoE (route, align, both GEMMs, combine).
With the router's GEMV left out its logits are a fixed random tensor, so routing stays uniform.

    python bench/bench_decode_ablate.py --batches 1,16 --contexts 256"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_layer import timed  # noqa: E402
from loader.dummy import dummy_config, fill_dummy  # noqa: E402
from model import attention_triton, fused_moe_triton, fused_triton, layers  # noqa: E402
from model.backend import Backend, pick_backend  # noqa: E402
from model.batch import AttnBatch  # noqa: E402
from model.stage import Stage  # noqa: E402

_cache: dict[tuple, torch.Tensor] = {}


def cached(shape, like: torch.Tensor) -> torch.Tensor:
    key = (tuple(shape), like.dtype, like.device)
    if key not in _cache:
        _cache[key] = torch.randn(*shape, dtype=like.dtype, device=like.device) * 0.02
    return _cache[key]


def stand_ins(cfg) -> dict[str, list[tuple[object, str, object]]]:
    """part -> [(module or class, attribute, replacement)]."""
    def linear(self, x, w):
        return cached((x.shape[0], w.shape[0]), x)

    def qkv_write(qkv, *a, **k):
        return qkv[:, :cfg.q_size].view(qkv.shape[0], cfg.num_attention_heads, cfg.head_dim)

    return {
        "attention": [(attention_triton, "paged_decode", lambda q, *a, **k: q)],
        "dense": [(Backend, "linear", linear)],
        "qk norm+rope+kv": [(fused_triton, "qkv_norm_rope_write", qkv_write)],
        "add+norms": [(layers, "norm", lambda x, *a, **k: x), (layers, "add_norm", lambda x, h, *a, **k: (h, h))],
        "moe": [(fused_moe_triton, "fused_moe", lambda x, *a, **k: cached(x.shape, x))],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="256")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    cfg = dummy_config("qwen3-30b-a3b")
    dev, dt, bs, L = torch.device("cuda:0"), torch.bfloat16, 64, args.layers
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    stage = fill_dummy(Stage(cfg, 0, L, False, False, dev, dt))
    pool = max(batches) * (-(-max(contexts) // bs)) + 8
    stage.allocate_kv(pool, bs)
    stage.kv_cache.normal_(0, 1)
    stage.backend = pick_backend(dev)
    parts = stand_ins(cfg)
    rows = []
    for B in batches:
        x = torch.randn(B, cfg.hidden_size, device=dev, dtype=dt)
        for ctx in contexts:
            n = -(-ctx // bs)
            batch = AttnBatch.build([1] * B, [ctx] * B, [[i * n + j for j in range(n)] for i in range(B)], bs,
                                    [True] * B, dev)
            batch.max_context = max(ctx, cfg.max_position_embeddings)  # as the engine's graphs
            res: dict[str, list[float]] = {}
            for rnd in range(2):
                for part in (["full", *parts] if rnd == 0 else [*parts, "full"]):
                    saved = [(o, a, getattr(o, a)) for o, a, _ in parts.get(part, [])]
                    for o, a, f in parts.get(part, []):
                        setattr(o, a, f)
                    try:
                        with torch.inference_mode():
                            res.setdefault(part, []).append(timed(lambda: stage(x, batch), reps=30) * 1e3 / L)
                    finally:
                        for o, a, f in saved:
                            setattr(o, a, f)
            best = {k: min(v) for k, v in res.items()}
            rows.append((B, ctx, best))
    for B, ctx, best in rows:
        full = best["full"]
        print(f"b{B} ctx {ctx}: full {full:.1f} us/layer; marginal cost, us/layer (x48 ms a step): "
              + ", ".join(f"{p} {full - best[p]:.1f} ({48 * (full - best[p]) / 1e3:.2f})" for p in parts))


if __name__ == "__main__":
    main()
