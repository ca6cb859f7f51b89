"""A strict, memory-mapped reader of the safetensors format, with no dependency beyond numpy/ml_dtypes.

Format: 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}}`,
then the raw tensor bytes. Reading maps the file and copies nothing until a tensor is asked for, so a
93 GB checkpoint is read one tensor at a time. Every inconsistency (a truncated file, offsets that do
not match the shape, an unknown dtype) is a `CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from mixtral_jax.errors import CheckpointError

from . import paths
from .pages import drop_mapping

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """The tensors of one `.safetensors` file: `keys()`, `shape(key)`, `dtype(key)`, `get(key)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = paths.normalize(path)
        self.remote = paths.is_url(self.path)  # a bucket: ranged reads instead of a mapping
        if not paths.is_file(self.path):
            raise CheckpointError(f"safetensors file not found: {self.path}")
        size = paths.size(self.path)
        with paths.open_binary(self.path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: not a safetensors file or truncated (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: malformed safetensors header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = {}
        data_size = size - self._data_start
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for {key!r}: {info!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {key!r} offsets do not match its shape {shape}")
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {key!r} ends at byte {end} but the file holds {data_size}")
            self._entries[key] = (dtype, shape, begin)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def location(self, key: str) -> tuple[str, int, np.dtype, tuple[int, ...]]:
        """(path, byte offset in the file, dtype, shape) of `key`: enough to read it with one `readinto`."""
        dtype, shape, begin = self._entries[key]
        return self.path, self._data_start + begin, dtype, shape

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only view of the mapped file (no copy until it is transformed)."""
        dtype, shape, begin = self._entries[key]
        if self.remote:  # one ranged read of exactly this tensor's bytes
            count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            out = np.empty(count, np.uint8)
            with paths.open_binary(self.path) as f:
                f.seek(self._data_start + begin)
                if f.readinto(memoryview(out)) != count:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {key!r}")
            return out.view(dtype).reshape(shape)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        start = self._data_start + begin
        return self._mmap[start:start + count * dtype.itemsize].view(dtype).reshape(shape)

    def release(self):
        """Drop the mapped pages read so far from this process (the mapping stays; nothing is reloaded)."""
        if self._mmap is not None:
            drop_mapping(self._mmap._mmap)  # the np.memmap's underlying mmap.mmap

    def close(self):
        self._mmap = None
