"""`python -m engine parity`: compare every sub-layer of chosen layers of a checkpoint with
transformers (the reference, from the `parity` extra) and exit non-zero on any failing row."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("parity", help="layer-by-layer parity of a checkpoint against transformers")
    p.add_argument("--model", help="model folder or hub id ORG/NAME (default: the embedded tiny preset)")
    p.add_argument("--layers", default=None,
                   help="layer indices, e.g. 0,1,47 (default: all of a model of up to 8 layers, else first two and last)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default bf16 on cuda, fp32 on cpu)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="text to run (needs the checkpoint's tokenizer.json)")
    src.add_argument("--tokens", type=int, default=32, help="random token ids to run (default 32)")
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run_parity_cli)
    return p


def run_parity_cli(a: argparse.Namespace) -> int:
    """0 when every row passes, 1 otherwise (the first failing sub-layer is named last)."""
    from ..tools.parity import format_report, run_parity
    model = a.model
    if model is None:
        from loader.writer import ensure_cached_preset
        model = str(ensure_cached_preset("tiny"))
    report = run_parity(model, a.layers, a.device, a.dtype, a.prompt, a.tokens, a.revision)
    print(json.dumps(report.to_dict(), indent=2) if a.json else format_report(report))
    return 0 if report.passed else 1
