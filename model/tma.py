"""Device-side TMA tensor descriptors (Hopper's bulk tile loads, `tl.make_tensor_descriptor` inside
a kernel): the scratch allocator Triton needs to build them, and where they can be used. The
interpreter runs descriptor loads too (tests on CPU), on host scratch."""
from __future__ import annotations

import functools
import os

import torch
import triton


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _scratch(size: int, align: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if _interpreted() else "cuda")


def use_descriptors() -> None:
    """Before a launch of a kernel that builds descriptors: Triton's scratch allocator for them."""
    triton.set_allocator(_scratch)


@functools.lru_cache(maxsize=None)
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def capable(t: torch.Tensor) -> bool:
    """TMA runs where t lives: a CUDA device of compute capability 9 and up, or the interpreter."""
    return _interpreted() or (t.is_cuda and _hopper(t.device.index or 0))


def rows_ok(*mats: torch.Tensor) -> bool:
    """Each tensor reads as a row-major matrix by TMA: last stride 1, 16-byte aligned base and rows
    (the other strides)."""
    return all(m.stride(-1) == 1 and m.data_ptr() % 16 == 0
               and all(s * m.element_size() % 16 == 0 for s in m.stride()[:-1]) for m in mats)
