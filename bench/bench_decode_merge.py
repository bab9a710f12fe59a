"""The decode attention's merge, fused into the split kernel (its last program per (sequence, kv
head) merges, the default for few splits) against the separate merge kernel, inside decode-layer
CUDA graphs: 8 layers of the 30b shape, dummy weights, us per layer, batches 4-32 at several
contexts, two alternating rounds (minimum). The graphs' split count follows max_model_len, as the
engine's decode graphs (engine/runtime/decode_graphs.py).

    python bench/bench_decode_merge.py > bench/results/decode_merge_<card>_<date>.log"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_layer import timed  # noqa: E402
from loader.dummy import dummy_config, fill_dummy  # noqa: E402
from model import attention_triton as at  # noqa: E402
from model.backend import pick_backend  # noqa: E402
from model.batch import AttnBatch  # noqa: E402
from model.stage import Stage  # noqa: E402

CASES = ((4, (128, 1024)), (8, (128, 1024)), (16, (128, 1024, 4096)), (24, (128, 1024)), (32, (1024,)))


def main() -> None:
    cfg = dummy_config("qwen3-30b-a3b")
    dev, dt, bs, layers = torch.device("cuda:0"), torch.bfloat16, 64, 8
    stage = fill_dummy(Stage(cfg, 0, layers, False, False, dev, dt))
    pool = 32 * 4200 // bs + 64
    stage.allocate_kv(pool, bs)
    stage.kv_cache.normal_(0, 1)
    stage.backend = pick_backend(dev)
    fused_splits = at.fused_merge_splits
    res = []
    for B, ctxs in CASES:
        x = torch.randn(B, cfg.hidden_size, device=dev, dtype=dt)
        for ctx in ctxs:
            n = -(-ctx // bs)
            tables = [[(i * n + j) % pool for j in range(n)] for i in range(B)]
            batch = AttnBatch.build([1] * B, [ctx] * B, tables, bs, [True] * B, dev)
            batch.max_context = max(ctx, cfg.max_position_embeddings)
            row: dict[str, list[float]] = {}
            for _ in range(2):
                for name in ("separate", "fused"):  # separate: no split count merges in the kernel
                    at.fused_merge_splits = fused_splits if name == "fused" else (lambda g: 1)
                    with torch.inference_mode():
                        row.setdefault(name, []).append(timed(lambda: stage(x, batch), reps=30) * 1e3 / layers)
            at.fused_merge_splits = fused_splits
            splits = at.choose_num_splits(B, cfg.num_key_value_heads, batch.max_context, dev)
            res.append((B, ctx, splits, {k: min(v) for k, v in row.items()}))
    for B, ctx, s, row in res:
        print(f"b{B:<3d} ctx {ctx:5d} splits {s:3d}: separate merge {row['separate']:6.1f}  fused {row['fused']:6.1f} "
              f"us/layer  ({48 * (row['fused'] - row['separate']) / 1e3:+.3f} ms a 48-layer step)")


if __name__ == "__main__":
    main()
