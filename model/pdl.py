"""Programmatic dependent launch (PDL, Hopper and later). A kernel launched with it may start while
the kernel before it in the stream is still finishing: its programs get resident, then wait in
`gdc_wait()` until every prerequisite grid has completed and its writes are visible. Inside the
decode CUDA graph this hides most of the launch gap between two dependent kernels (a batch-1
layer is a dozen small kernels, whose gaps cost about as much as their bytes).

The rule every kernel here keeps: with PDL on, `gdc_wait()` comes before the kernel's first global
load or store (weights included), then `gdc_launch_dependents()` lets the next kernel be scheduled.
Because each waits for its predecessor to complete, completion stays in stream order, so a kernel
never sees a half-written input or overwrites one still being read.

Off under TRITON_INTERPRET (the interpreter has no grid-dependency ops), below compute capability
9, and with MOEPIPE_PDL=0."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_forced: bool | None = None  # set_enabled() (benchmarks compare both in one process)


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if _forced is not None:
        return _forced
    if os.environ.get("MOEPIPE_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def set_enabled(on: bool | None) -> None:
    """Force PDL on or off for later launches (None: the default). Kernels compile per setting."""
    global _forced
    _forced = on


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel taking `PDL: tl.constexpr`: the constexpr and, when on, the
    launch attribute."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of a kernel launched by launch_args(): wait for the kernel before it,
    then let the one after it be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
