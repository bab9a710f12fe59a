"""moepipe engine: `from engine import LLM, SamplingParams`. Names are imported on first use, so
`python -m engine` starts (and answers Ctrl-C) before torch is loaded."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": ".llm", "EngineClosed": ".client", "StageDied": ".client",
    "RequestStream": ".request_stream", "TokenEvent": ".request_stream",
    "EngineOptions": ".options",
    "RequestOutput": ".params", "SamplingParams": ".params",
    "RequestRefused": ".scheduler",
    "StructuredOutputsParams": ".structured.params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
