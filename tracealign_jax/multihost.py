"""Host-side work split over the processes of a multi-host run, and the gathers that reassemble it.

Each process takes a contiguous slice of the items (``process_slice``) and works on it alone; the
``allgather_*`` functions return every process's results in item order, on every process, so what
follows (writing a store, compiling a table) sees exactly what a single process would have computed.
A single-process run takes every item and gathers nothing. The gathers travel as raw bytes, so int64
and float64 arrays arrive bit-exact (JAX without x64 would narrow them).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def process_slice(n: int) -> slice:
    """This process's contiguous share of ``n`` items (sizes differ by at most one)."""
    p, k = jax.process_index(), jax.process_count()
    return slice(n * p // k, n * (p + 1) // k)


def _allgather_bytes(local: np.ndarray) -> list[np.ndarray]:
    """Every process's uint8 [n_p, W] array (W equal everywhere), in process order."""
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([local.shape[0]], np.int32))).reshape(-1)
    padded = np.zeros((int(counts.max()), local.shape[1]), np.uint8)
    padded[: local.shape[0]] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [gathered[i, : int(c)] for i, c in enumerate(counts)]


def allgather_rows(local: np.ndarray) -> np.ndarray:
    """The concatenation over processes (in process order) of each one's ``local`` rows [n_p, ...]
    (same trailing shape and dtype on every process); every process receives the whole array."""
    local = np.ascontiguousarray(local)
    if jax.process_count() == 1:
        return local
    row_shape = local.shape[1:]
    elems = int(np.prod(row_shape, dtype=np.int64))
    parts = _allgather_bytes(local.reshape(local.shape[0], elems).view(np.uint8))
    return np.concatenate(parts).view(local.dtype).reshape((-1,) + row_shape)


def allgather_ragged(arrays: Sequence[np.ndarray], dtype: np.dtype) -> list[np.ndarray]:
    """Each process's list of 1-D arrays (any lengths, one dtype) -> all of them, in process order."""
    lengths = allgather_rows(np.asarray([len(a) for a in arrays], np.int64))
    flat = allgather_rows(np.concatenate([np.asarray(a, dtype) for a in arrays]) if arrays else np.zeros(0, dtype))
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
