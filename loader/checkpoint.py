"""Checkpoint index: which shard holds each tensor, and each shard's header (shape, dtype, offsets),
read without touching tensor data. Missing and truncated files fail here, naming the file."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or holds the wrong tensors."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype code: BF16, F32, ...
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check the file is long enough for every tensor."""
    if not path.exists():
        raise CheckpointError(f"{path}: shard file is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: truncated or corrupt file (header of {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, h in header.items():
        try:
            begin, stop = h["data_offsets"]
            out[name] = TensorInfo(name, path, h["dtype"], tuple(h["shape"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated file: {size} bytes, but its header needs {8 + n + end}")
    return out


class CheckpointIndex:
    """name -> shard file for a folder holding model.safetensors.index.json or model.safetensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                assert isinstance(wm, dict)
            except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
                raise CheckpointError(f"{index}: malformed index (expected a 'weight_map' object)") from None
            self.weight_map = {k: self.folder / v for k, v in wm.items()}
        elif single.exists():
            self.weight_map = {k: single for k in read_header(single)}
        else:
            raise CheckpointError(f"{self.folder}: no {INDEX_NAME} or {SINGLE_NAME} found")
        self._headers: dict[Path, dict[str, TensorInfo]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> TensorInfo:
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = read_header(file)
        hdr = self._headers[file]
        if name not in hdr:
            raise CheckpointError(f"{file}: tensor {name!r} is listed in the index but not in this shard")
        return hdr[name]

    def files_for(self, names: list[str]) -> list[Path]:
        return sorted({self.weight_map[n] for n in names})
