"""Point-to-point messages between stages: a fixed int64 header, then an optional tensor payload,
then optional pickled metadata bytes. Shapes change every step, so the header goes first."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BATCH, STATS, STOP = 0, 1, 2
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
_HEADER = 6  # kind, mb_id, rows, cols, dtype code, meta bytes


@dataclass
class Message:
    kind: int
    mb_id: int
    payload: torch.Tensor | None
    meta: Any


class Link:
    """Messages over one process group. Sends are asynchronous; their tensors are kept alive until
    the next send completes them (NCCL orders them on the peer's stream anyway)."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self._pending: list = []

    def send(self, dst: int, kind: int, mb_id: int, payload: torch.Tensor | None = None, meta: Any = None) -> None:
        for w in self._pending:
            w.wait()
        raw = pickle.dumps(meta) if meta is not None else b""
        rows, cols = (payload.shape[0], payload.shape[1] if payload.ndim == 2 else 0) if payload is not None else (0, 0)
        code = _DTYPES.index(payload.dtype) if payload is not None else 0
        header = torch.tensor([kind, mb_id, rows, cols, code, len(raw)], dtype=torch.int64, device=self.device)
        tensors = [header]
        if payload is not None and rows:
            tensors.append(payload.contiguous())
        if raw:
            tensors.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device))
        self._pending = [dist.isend(t, dst, group=self.group) for t in tensors]
        self._keep = tensors

    def recv(self, src: int) -> Message:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src, group=self.group)
        kind, mb_id, rows, cols, code, nbytes = header.tolist()
        payload = None
        if rows:
            shape = (rows, cols) if cols else (rows,)
            payload = torch.empty(shape, dtype=_DTYPES[code], device=self.device)
            dist.recv(payload, src, group=self.group)
        meta = None
        if nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dist.recv(buf, src, group=self.group)
            meta = pickle.loads(buf.cpu().numpy().tobytes())
        return Message(kind, mb_id, payload, meta)

    def flush(self) -> None:
        for w in self._pending:
            w.wait()
        self._pending = []
