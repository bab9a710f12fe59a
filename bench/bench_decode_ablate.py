"""What each part of a decode layer adds to the step, inside decode-layer CUDA graphs: the layer
with one part replaced by a launch-free stand-in (a cached tensor or a view of the right shape;
outputs are wrong, timing only), its marginal cost = full - without. 8 layers of the 30b shape,
dummy weights, block 64, us per layer, min of two alternating rounds. Parts: the decode attention
(split + merge), the dense projections (qkv, o_proj and the router, cuBLAS or the Triton GEMV),
the q/k norm + rope + KV write, the add + RMSNorms, the MoE (route, align, both GEMMs, combine).
With the router's GEMV left out its logits are a fixed random tensor, so routing stays uniform.
--ab FIELD=VALUE (repeatable) times the whole layer with that Backend field changed beside the
default instead, alternating over --rounds rounds: the A/B of a kernel switch.

    python bench/bench_decode_ablate.py --batches 1,16 --contexts 256
    python bench/bench_decode_ablate.py --batches 16,32,64 --ab moe_rows_max_pairs=0 --rounds 4"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_layer import timed  # noqa: E402
from loader.dummy import dummy_config, fill_dummy  # noqa: E402
from model import attention_triton, fused_triton, layers, moe_dispatch  # noqa: E402
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
        "moe": [(moe_dispatch, "fused_moe", lambda x, *a, **k: cached(x.shape, x))],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="256")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ab", action="append", default=[], metavar="FIELD=VALUE",
                    help="time the layer with this Backend field changed (int value) beside the default")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each figure is the min")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    fields = {f.name for f in dataclasses.fields(Backend)}
    variants = {}
    for spec in args.ab:
        name, _, value = spec.partition("=")
        if name not in fields or not value.lstrip("-").isdigit():
            ap.error(f"--ab {spec!r}: expected FIELD=INT with FIELD one of {', '.join(sorted(fields))}")
        variants[spec] = (name, int(value))
    cfg = dummy_config("qwen3-30b-a3b")
    dev, dt, bs, L = torch.device("cuda:0"), torch.bfloat16, 64, args.layers
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    stage = fill_dummy(Stage(cfg, 0, L, False, False, dev, dt))
    pool = max(batches) * (-(-max(contexts) // bs)) + 8
    stage.allocate_kv(pool, bs)
    stage.kv_cache.normal_(0, 1)
    base = stage.backend = pick_backend(dev)
    parts = {} if variants else stand_ins(cfg)
    backends = {"full": base, **{k: dataclasses.replace(base, **{n: v}) for k, (n, v) in variants.items()}}
    rows = []
    for B in batches:
        x = torch.randn(B, cfg.hidden_size, device=dev, dtype=dt)
        for ctx in contexts:
            n = -(-ctx // bs)
            batch = AttnBatch.build([1] * B, [ctx] * B, [[i * n + j for j in range(n)] for i in range(B)], bs,
                                    [True] * B, dev)
            batch.max_context = max(ctx, cfg.max_position_embeddings)  # as the engine's graphs
            res: dict[str, list[float]] = {}
            order = [*backends, *parts]
            for rnd in range(args.rounds):
                for part in (order if rnd % 2 == 0 else order[::-1]):
                    saved = [(o, a, getattr(o, a)) for o, a, _ in parts.get(part, [])]
                    for o, a, f in parts.get(part, []):
                        setattr(o, a, f)
                    stage.backend = backends.get(part, base)
                    try:
                        with torch.inference_mode():
                            res.setdefault(part, []).append(timed(lambda: stage(x, batch), reps=30) * 1e3 / L)
                    finally:
                        stage.backend = base
                        for o, a, f in saved:
                            setattr(o, a, f)
            rows.append((B, ctx, res))
    for B, ctx, res in rows:
        best = {k: min(v) for k, v in res.items()}
        full = best["full"]
        spread = f"(rounds {min(res['full']):.1f}-{max(res['full']):.1f})"
        if variants:
            print(f"b{B} ctx {ctx}: default {full:.1f} us/layer {spread}; "
                  + ", ".join(f"{v} {best[v]:.1f} ({min(res[v]):.1f}-{max(res[v]):.1f}, {best[v] - full:+.1f})"
                              for v in variants))
            continue
        print(f"b{B} ctx {ctx}: full {full:.1f} us/layer {spread}; marginal cost, us/layer (x48 ms a step): "
              + ", ".join(f"{p} {full - best[p]:.1f} ({48 * (full - best[p]) / 1e3:.2f})" for p in parts))


if __name__ == "__main__":
    main()
