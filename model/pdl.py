"""Programmatic dependent launch (PDL, Hopper and later). A kernel launched with it may start while
the kernel before it in the stream is still finishing: its programs get resident, then wait in
`gdc_wait()` until every prerequisite grid has completed and its writes are visible. Inside the
decode CUDA graph this hides part of the launch gap between two dependent kernels (a batch-1
layer is a dozen small kernels, whose gaps cost about as much as their bytes).

The rule every kernel here keeps: with PDL on, `gdc_wait()` comes before the kernel's first global
load or store, with one exception: the one-token dense GEMV (model/linear_triton.py) loads its
first weight tile, read-only model weights, before waiting. So that this overlaps something, the
kernels before such a GEMV (the RMSNorms, and the attention's split and merge, whose merge
precedes o_proj) call `gdc_launch_dependents()` on entry, before their own wait: the GEMV's
programs get resident and stream their weights while those run. Only weights are read before a
wait, so releasing early is safe whatever the next kernel is. Every other kernel lets the next
launch as its programs exit. Because each waits for its predecessor to complete, completion stays
in stream order, so a kernel never sees a half-written input or overwrites one still being read.

Off under TRITON_INTERPRET (the interpreter has no grid-dependency ops) and below compute
capability 9. Kernels take `PDL: tl.constexpr` (0 off, 1 on) from launch_args()."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_forced: bool | None = None  # set_enabled(): tests and benchmarks launch the same kernels with PDL off


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on device launch with PDL: on CUDA of capability 9 and up, outside the
    interpreter, unless set_enabled(False)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or _forced is False:
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def set_enabled(on: bool | None) -> None:
    """False: later launches go without PDL (kernels compile per setting); None or True: the
    default, on where the device has it."""
    global _forced
    _forced = None if on is None else bool(on)


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel taking `PDL: tl.constexpr`: the flag and, when on, the
    launch attribute."""
    return {"PDL": 1, "launch_pdl": True} if enabled(device) else {"PDL": 0}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of a kernel launched by launch_args(): wait for the kernel before it."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """At the entry of a kernel that precedes a GEMV (before pdl_enter): let the GEMV be scheduled
    now, so that it streams its weights while this kernel runs."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_prefetched(PDL: tl.constexpr):
    """In a GEMV: pdl_enter's wait, placed after its first weight tile's loads."""
    if PDL:
        gdc_wait()
