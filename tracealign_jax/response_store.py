"""Per-response float32 arrays for a tokenized pair set, stored with tensorstore (zarr v3).

One value per response token of each (chosen, rejected) pair: per-token BCI (written by
``provenance.token_bci``) or reference log-probs (``training.reference``). Shared by both, so neither
imports the other. Layout under ``store_path`` (a directory or any tensorstore kvstore URL:
``file://``, ``gs://``, ``s3://``, ``memory://``...):
  chosen/, rejected/            zarr v3 float32[N, T_max], 0-padded, chunked by example
  chosen_len/, rejected_len/    zarr v3 int32[N], real response lengths (tokens)
  meta.json                     {"format", "num_examples", "max_len", ...}; written last
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

FORMAT = "tracealign-token-bci-v1"  # the on-disk name predates the shared module; kept so old stores read
RESPONSES = ("chosen", "rejected")


def _kvstore(store_path: str, sub: str = "") -> str:
    """A kvstore URL for ``store_path`` (plain paths become ``file://`` URLs) joined with ``sub``."""
    base = str(store_path)
    if "://" not in base:
        base = "file://" + str(Path(base).resolve())
    base = base.rstrip("/") + "/"
    return base + sub


def write_response_arrays(store_path: str, examples: Sequence[tuple[np.ndarray, np.ndarray]], *,
                          chunk_examples: int = 64, meta: dict | None = None, overwrite: bool = False) -> str:
    """Writes ``[(chosen float32[T_c], rejected float32[T_r]), ...]`` to ``store_path``.

    Returns the kvstore URL of the store. Refuses to replace an existing store unless ``overwrite``.
    """
    kv = ts.KvStore.open(_kvstore(store_path)).result()
    if not overwrite and kv.read("meta.json").result().state == "value":
        raise FileExistsError(f"{store_path}: a response-array store exists (pass overwrite=True / --overwrite)")
    if overwrite:  # drop the old meta first so a crash mid-write never leaves a store that looks complete
        kv.delete_range(ts.KvStore.KeyRange("meta.json", "meta.json\0"))
    n = len(examples)
    max_len = max([1] + [max(len(c), len(r)) for c, r in examples])
    chunk = max(1, min(chunk_examples, max(n, 1)))
    for i, name in enumerate(RESPONSES):
        values = np.zeros((n, max_len), dtype=np.float32)
        lengths = np.zeros((n,), dtype=np.int32)
        for j, ex in enumerate(examples):
            arr = np.asarray(ex[i], dtype=np.float32)
            values[j, : arr.size] = arr
            lengths[j] = arr.size
        _create(store_path, name, "float32", [n, max_len], [chunk, max_len]).write(values).result()
        _create(store_path, f"{name}_len", "int32", [n], [max(chunk, 1024)]).write(lengths).result()
    info = dict(meta or {}, format=FORMAT, num_examples=n, max_len=max_len)
    # meta.json is written last: its presence marks a complete store.
    kv.write("meta.json", json.dumps(info, indent=2, sort_keys=True).encode()).result()
    return _kvstore(store_path)


def _create(store_path: str, name: str, dtype: str, shape: list[int], chunks: list[int]) -> ts.TensorStore:
    spec = {
        "driver": "zarr3",
        "kvstore": _kvstore(store_path, name + "/"),
        "metadata": {
            "shape": shape,
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(c, 1) for c in chunks]}},
            # crc32c after zstd: a flipped byte in a chunk fails the read instead of returning other values
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}, {"name": "crc32c"}],
        },
        "create": True,
        "delete_existing": True,
    }
    return ts.open(spec).result()


class ResponseArrayReader:
    """Reads per-response arrays in batches (tensorstore reads only the chunks a batch touches)."""

    def __init__(self, store_path: str):
        self.url = _kvstore(store_path)
        raw = ts.KvStore.open(self.url).result().read("meta.json").result()
        if raw.state != "value":
            raise FileNotFoundError(f"{store_path}: no meta.json (not a complete response-array store)")
        self.meta: dict[str, Any] = json.loads(bytes(raw.value).decode())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{store_path}/meta.json: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.num_examples = int(self.meta["num_examples"])
        self.max_len = int(self.meta["max_len"])
        self._arrays = {name: ts.open({"driver": "zarr3", "kvstore": _kvstore(store_path, name + "/"),
                                       "open": True}).result()
                        for name in (*RESPONSES, *(f"{r}_len" for r in RESPONSES))}

    def __len__(self) -> int:
        return self.num_examples

    def read_padded(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """``{"chosen": float32[B, T_max], "rejected": ..., "chosen_len": int32[B], "rejected_len": ...}``."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
            raise IndexError(f"{self.url}: example index out of range [0, {self.num_examples})")
        futures = {name: arr[idx].read() for name, arr in self._arrays.items()}
        try:
            return {name: np.asarray(f.result()) for name, f in futures.items()}
        except ValueError as err:  # tensorstore: DATA_LOSS (crc32c digest mismatch, truncated chunk) names the file
            from tracealign_jax.atomic_io import IntegrityError

            raise IntegrityError(f"{self.url}: corrupted chunk ({err}); rebuild the store") from None

    def read(self, indices: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(chosen, rejected)``: lists of float32[T_i] trimmed to each response's length."""
        got = self.read_padded(indices)
        return tuple(  # type: ignore[return-value]
            [got[r][i, : got[f"{r}_len"][i]].copy() for i in range(len(indices))] for r in RESPONSES
        )
