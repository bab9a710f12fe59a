"""`python -m engine plan`: will a model fit N cards of a given size, and how much KV cache (tokens,
sequences) is left? The arithmetic lives in engine/tools/plan.py; no weights are read and no GPU is needed."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from loader.partition import parse_layout
from model.config import parse_dtype

from ..tools.plan import GIB, _default_gpu_gib, default_reserve_gib, format_plan, resolve_model, stage_plan

__all__ = ["GIB", "add_parser", "default_reserve_gib", "resolve_model", "run_plan", "stage_plan"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="will the model fit: weights and KV capacity per stage")
    p.add_argument("--model", required=True, help="DIR (with config.json), path/to/config.json or a preset")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory per card in GiB (default: the visible CUDA device's, else 80)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", default=None, help="layers per stage, e.g. 25,23 (default: even split)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    """0 when it fits (context included), 2 when it does not; ValueError for bad input."""
    cfg = resolve_model(args.model)
    gib = args.gpu_memory if args.gpu_memory is not None else _default_gpu_gib()
    counts = parse_layout(args.layers) if args.layers else None
    p = stage_plan(cfg, args.stages, args.context, gib, parse_dtype(args.dtype, "--dtype"), counts)
    print(json.dumps(asdict(p), indent=2) if args.json else format_plan(p))
    return 0 if p.fits and p.context_ok else 2
