"""Lazy package exports (PEP 562): a package's names are imported from their modules on first use,
so importing the package costs nothing (no torch for `python -m engine`, no xgrammar for params)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The package's module-level __getattr__: exports maps a name to its module, relative to package."""
    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
