"""moepipe command line: one subcommand per module of engine/cli/ listed in COMMANDS."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile

COMMANDS = ("generate", "plan", "profile", "make_checkpoint", "parity", "serve")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine", description="moepipe: pipeline-parallel Qwen3-MoE",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"engine.cli.{name}").add_parser(sub)
    return ap


def _interrupted(signum, frame) -> None:
    """Ctrl-C at any moment (even inside an import that swallows KeyboardInterrupt): one line,
    the stage processes ended, exit 130."""
    # engine.client may be half-imported (Ctrl-C inside its import): no kill_workers yet, and no
    # workers either, since they start only after the import
    kill = getattr(sys.modules.get("engine.client"), "kill_workers", None)
    if kill is not None:
        try:
            kill()
        except Exception:  # the one line below still goes out; the workers die with their parent
            pass
    sys.stdout.flush()
    print("error: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line itself, not a caller inside Python
        signal.signal(signal.SIGINT, _interrupted)
    try:
        a = build_parser().parse_args(argv)
        return a.run(a)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, TimeoutError) as e:
        lines = str(e).splitlines()
        msg = lines[0] if lines else type(e).__name__
        if len(lines) > 1:  # a stage's traceback: kept in a file, not printed
            fd, path = tempfile.mkstemp(prefix="moepipe-error-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(str(e) + "\n")
            msg += f" (details: {path})"
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
