"""The safetensors format, read through ``np.memmap`` and written one tensor at a time.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(offsets relative to the end of the header), then the raw little-endian C-order tensor bytes.

Reading maps the file and returns zero-copy NumPy views, so slicing a tensor touches only the pages
of that slice (a device's shard of a weight is read without materializing the whole weight).
Writing lays out the header from shapes first, then streams each tensor's bytes as it is produced,
so at most one tensor is on the host at a time. bfloat16 uses ``ml_dtypes`` (no torch).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit; guards against garbage files


class SafetensorsReader:
    """Zero-copy access to the tensors of one ``.safetensors`` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: header length {n} is invalid (not a safetensors file?)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{self.path}: header is not valid JSON ({err})") from err
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + n
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor '{name}' has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
            if end - begin != expected or self._data_start + end > size:
                raise ValueError(f"{self.path}: tensor '{name}' byte range {begin}:{end} does not fit its shape or the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor ``name`` (no bytes are read until it is indexed)."""
        entry = self._entries[name]
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if begin == end:
            return np.zeros(entry["shape"], dtype)
        flat = self._map[self._data_start + begin : self._data_start + end]
        return flat.view(dtype).reshape(entry["shape"])


TensorPlan = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_safetensors(path: str | Path, tensors: Iterable[TensorPlan], metadata: Mapping[str, str]) -> int:
    """Writes ``(name, shape, dtype, produce)`` tensors to ``path``, calling each ``produce()`` only
    when its bytes are due. Returns the bytes of tensor data written."""
    plan = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, shape, dtype, _ in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in plan:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{path}: tensor '{name}' produced shape {array.shape}, planned {tuple(shape)}")
            f.write(array.tobytes())
    return offset
