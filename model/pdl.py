"""Programmatic dependent launch (PDL, Hopper and later). A kernel launched with it may start while
the kernel before it in the stream is still finishing: its programs get resident, then wait in
`gdc_wait()` until every prerequisite grid has completed and its writes are visible. Inside the
decode CUDA graph this hides part of the launch gap between two dependent kernels (a batch-1
layer is a dozen small kernels, whose gaps cost about as much as their bytes).

The rule every kernel here keeps: with PDL on, `gdc_wait()` comes before the kernel's first global
load or store, with one exception: in the PREFETCH mode the one-token dense GEMV
(model/linear_triton.py) loads its weight tile, read-only model weights, before waiting. So that
this overlaps something, the kernels before such a GEMV (the RMSNorms, and the attention's split
and merge, whose merge precedes o_proj) call `gdc_launch_dependents()` on entry, before their own
wait: the GEMV's programs get resident and stream their weights while those run. Only weights are
read before a wait, so releasing early is safe whatever the next kernel is. In the EARLY mode
every kernel lets the next be scheduled once it has waited; otherwise the next launches as this
one's programs exit.
Because each waits for its predecessor to complete, completion stays in stream order, so a kernel
never sees a half-written input or overwrites one still being read.

Off under TRITON_INTERPRET (the interpreter has no grid-dependency ops), below compute capability
9, and with MOEPIPE_PDL=0 (1: wait-only, 2: early, 3: prefetch, the default)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# PDL modes: 0 off; 1 wait for the previous kernel (the next one launches as this one exits);
# 2 wait, then let the next kernel be scheduled at once (its programs wait resident); 3 as 1, but
# the GEMVs load their weights before waiting, and the kernels before them release them early.
WAIT_ONLY, EARLY, PREFETCH = 1, 2, 3
# H200, 30b shape, 4 decode layers in one CUDA graph at batch 1, us per layer, one call
# (bench/results/decode_layer_H200_2026-11-28_v4_L4.json): off 70.2, wait-only 69.1, early 74.9; at a
# 32k context 92.4, 87.0, 96.0. Early scheduling puts the next kernel's waiting programs beside the
# weight-streaming GEMVs' last wave and slows them. With the sixth session's kernels
# (bench/results/decode_layer_H200_2026-11-28_s6_after.json): off 64.4, wait-only 63.0, early 62.4,
# prefetch 59.9; at 32k 87.2, 82.0, 82.8, 79.0; at batch 8 all within 1.5%.
DEFAULT_MODE = PREFETCH
_forced: int | None = None  # set_enabled() (benchmarks compare the modes in one process)


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def mode(device: torch.device) -> int:
    """The PDL mode for kernels on device: MOEPIPE_PDL (0 to 3; default DEFAULT_MODE) where
    the device has it, else 0."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    m = _forced if _forced is not None else _env_mode()
    return m if m and _capable(device.index if device.index is not None else torch.cuda.current_device()) else 0


def _env_mode() -> int:
    raw = os.environ.get("MOEPIPE_PDL", str(DEFAULT_MODE)).strip()
    if raw not in ("0", "1", "2", "3"):
        raise ValueError(f"MOEPIPE_PDL={raw!r}: expected 0 (off), 1 (wait-only), 2 (early) or 3 (prefetch)")
    return int(raw)


def set_enabled(m: int | bool | None) -> None:
    """Force a PDL mode (True: EARLY, False: 0) for later launches; None: the default. Kernels
    compile per mode."""
    global _forced
    _forced = None if m is None else int(EARLY if m is True else m)


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel taking `PDL: tl.constexpr`: the mode and, when on, the
    launch attribute."""
    m = mode(device)
    return {"PDL": m, "launch_pdl": True} if m else {"PDL": 0}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of a kernel launched by launch_args(): wait for the kernel before it,
    then let the one after it be scheduled."""
    if PDL >= 1:
        gdc_wait()
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """In the PREFETCH mode, at a kernel's entry (before pdl_enter): let the next kernel (a GEMV
    that prefetches its weights) be scheduled now."""
    if PDL == 3:
        gdc_launch_dependents()


@triton.jit
def pdl_prefetched(PDL: tl.constexpr):
    """In a GEMV: pdl_enter's wait, placed after the weight loads in the PREFETCH mode (the GEMV
    then calls pdl_enter only when PDL != 3)."""
    if PDL == 3:
        gdc_wait()
