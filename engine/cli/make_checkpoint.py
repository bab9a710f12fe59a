"""`python -m engine make-checkpoint`: write a random-weight Qwen3-MoE checkpoint (HF layout)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loader.presets import PRESETS, preset_config, yarn_config
from loader.writer import write_checkpoint


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("make-checkpoint", help="write a random-weight Qwen3-MoE checkpoint (HF layout)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output folder (must be absent or empty unless --force)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weight dtype (default: the preset's torch_dtype; written into config.json)")
    p.add_argument("--fused-experts", action="store_true", help="write mlp.experts.gate_up_proj/down_proj")
    p.add_argument("--yarn", action="store_true", help="apply Qwen's YaRN override (factor 4, 131072 positions)")
    p.add_argument("--device", default="cpu", help="where to generate values, e.g. cuda (default cpu)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="max shard size in GiB (default 2)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(run=run)
    return p


def _progress_printer(every: int = 4 * 2**30):
    start, state = time.monotonic(), {"next": every}

    def report(done: int, total: int) -> None:
        if done >= state["next"] or done == total:
            state["next"] = done + every
            dt = max(time.monotonic() - start, 1e-9)
            unit, scale = ("GB", 1e9) if total >= 1e9 else ("MB", 1e6)
            print(f"wrote {done / scale:.1f}/{total / scale:.1f} {unit} in {dt:.1f}s ({done / 1e9 / dt:.2f} GB/s)",
                  file=sys.stderr, flush=True)
    return report


def run(args: argparse.Namespace) -> int:
    import torch
    try:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
            raise ValueError(f"{out} exists and is not empty (use --force to overwrite)")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda given but CUDA is not available")
        config = preset_config(args.preset)
        if args.yarn:
            config = yarn_config(config)
        if args.dtype:
            config["torch_dtype"] = args.dtype
        write_checkpoint(out, config, seed=args.seed, dtype=args.dtype, fused_experts=args.fused_experts,
                         shard_bytes=int(args.shard_gb * 2**30), device=args.device, progress=_progress_printer())
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
