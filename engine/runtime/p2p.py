"""Point-to-point messages between stages, no pickle: a fixed int64 header (engine/runtime/step_plan.py)
first, then the tensors whose sizes it gives. Sends are asynchronous; their tensors stay alive until
the next send on the link completes them."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .step_plan import HEADER

BATCH, STATS, STOP = 0, 1, 2


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device: through pinned memory (torch's caching host allocator keeps the
    block until the asynchronous copy is done) on CUDA, a private copy on CPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t.clone()
    return t.pin_memory().to(device, non_blocking=True)


class Link:
    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self._pending: list = []
        self._keep: list = []

    def send(self, dst: int, header: np.ndarray | None, tensors: list[torch.Tensor]) -> None:
        """Send the header (None: none, the receiver knows the sizes) then the tensors, in order."""
        self.flush()
        out = ([to_device(header, self.device)] if header is not None else []) + \
              [t.contiguous() for t in tensors if t.numel()]
        self._pending = [dist.isend(t, dst, group=self.group) for t in out]
        self._keep = out
    def recv_header(self, src: int) -> list[int]:
        h = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(h, src, group=self.group)
        return h.tolist()

    def recv(self, src: int, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel():
            dist.recv(tensor, src, group=self.group)
        return tensor

    def irecv(self, src: int, tensor: torch.Tensor):
        return dist.irecv(tensor, src, group=self.group) if tensor.numel() else None

    def flush(self) -> None:
        for w in self._pending:
            w.wait()
        self._pending = []
