"""moepipe command line: generate | plan | profile | bench | make-checkpoint."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .cli_generate import add_generate_parser
    ap = argparse.ArgumentParser(prog="python -m engine", description="moepipe: pipeline-parallel Qwen3-MoE")
    sub = ap.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    try:
        from loader.writer import add_make_checkpoint_parser
        add_make_checkpoint_parser(sub)
    except ImportError:
        pass
    for mod in ("plan", "profile"):
        try:
            m = __import__(f"engine.{mod}", fromlist=["add_parser"])
            m.add_parser(sub)
        except ImportError:
            pass
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "generate":
            from .cli_generate import run_generate
            return run_generate(a)
        return (getattr(a, "run", None) or a.func)(a)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, TimeoutError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
