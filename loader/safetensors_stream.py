"""Write a .safetensors file tensor by tensor: header from planned entries, then raw bytes in order."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_CODES: dict[torch.dtype, str] = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def build_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """8-byte little-endian length + JSON header padded with spaces to a multiple of 8.
    Offsets are relative to the end of the header, in the order given (contiguous, no gaps)."""
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        if e.dtype not in DTYPE_CODES:
            raise ValueError(f"{e.name}: dtype {e.dtype} is not supported by this writer")
        if e.name in header:
            raise ValueError(f"duplicate tensor name {e.name!r}")
        header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


class SafetensorsStreamWriter:
    """Writes the header at open, then accepts byte chunks that must add up to each entry in order.
    Usage: with SafetensorsStreamWriter(path, entries) as w: w.write(chunk_tensor) ..."""

    def __init__(self, path: str | Path, entries: list[TensorEntry]):
        self.path = Path(path)
        self.entries = list(entries)
        self.header = build_header(self.entries)
        self.data_bytes = sum(e.nbytes for e in self.entries)
        self._written = 0
        self._f: BinaryIO | None = None

    def __enter__(self) -> "SafetensorsStreamWriter":
        self._f = open(self.path, "wb")
        self._f.write(self.header)
        return self

    def write(self, chunk: torch.Tensor) -> int:
        """Append a CPU tensor's raw bytes (little-endian host assumed, as safetensors requires)."""
        assert self._f is not None, "writer is not open"
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + data.nbytes > self.data_bytes:
            raise ValueError(f"{self.path.name}: more bytes written than the header declares")
        self._f.write(memoryview(data))
        self._written += data.nbytes
        return data.nbytes

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._f is not None
        self._f.close()
        self._f = None
        if exc_type is None and self._written != self.data_bytes:
            raise ValueError(f"{self.path.name}: wrote {self._written} bytes, header declares {self.data_bytes}")
