"""On-disk format of a TraceIndex (version 2): raw little-endian arrays, np.memmap-able, + manifest.

Files in an index directory:
  ``tokens.bin``          uint16 (vocab <= 65535) or uint32 token ids, documents back to back, each
                          followed by the separator ``sep = vocab_size`` (larger than every token, so it
                          sorts last and no match crosses a document).
  ``suffix_array.bin``    the suffix arrays of all shards back to back (one entry per token position),
                          each entry a shard-local position of ``sa_bits = ceil(log2(max shard length))``
                          bits, bit-packed: entry g occupies bits ``[g * sa_bits, (g + 1) * sa_bits)`` of
                          the file read as one little-endian integer (23 bits for 5 M-position shards,
                          where whole bytes would take 24). ``SA_PAD_BYTES`` zero bytes follow, so a
                          reader may always load 5 bytes at an entry's first byte.
                          Shards are contiguous runs of whole documents, < 2^31 positions each,
                          sorted independently and in parallel.
  ``doc_starts.bin``      int64[num_docs + 1]: token position where each document starts; document d
                          holds tokens ``[starts[d], starts[d+1] - 1)`` and its separator at
                          ``starts[d+1] - 1``.
  ``shard_counts.bin``    int32[num_shards, vocab_size + 1]: count of every token (last column: the
                          separator) in each shard. Their running sum is where each first token's block
                          starts in the shard's suffix array, so a search starts inside that block; their
                          sum over shards is the corpus unigram count.
  ``metadata.parquet``    one row per document: ``risk`` float64 in [0, 1], ``category`` string,
                          ``meta_json`` (the record's metadata fields as JSON; no pickle).
  ``tokenizer/``          (optional) the tokenizer files the corpus was tokenized with.
  ``manifest.json``       format version, tokenizer name + hash, vocab size, dtype, counts, shard
                          boundaries, build stats and every file's size and SHA-256.

All shards live in one token file and one suffix-array file (shards are logical) so a query passes
a few plain arrays to one compiled call: unboxing a numba typed list of per-shard arrays on every
call would cost as much as the count itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracealign_jax.atomic_io import IntegrityError

FORMAT_NAME = "tracealign-index"
FORMAT_VERSION = 2
TOKENS_FILE = "tokens.bin"
SA_FILE = "suffix_array.bin"
DOC_STARTS_FILE = "doc_starts.bin"
SHARD_COUNTS_FILE = "shard_counts.bin"
METADATA_FILE = "metadata.parquet"
TOKENIZER_DIR = "tokenizer"
MAX_SHARD_POSITIONS = 2**31 - 1
SA_PAD_BYTES = 4


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when the separator (= vocab_size) fits, else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 0xFFFF:
        return np.dtype("<u2")
    if vocab_size <= 0xFFFFFFFF:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def sa_bits(max_shard_positions: int) -> int:
    """Bits per suffix-array entry: enough for positions 0 .. max_shard_positions - 1."""
    return max(1, math.ceil(math.log2(max(max_shard_positions, 2))))


def sa_bytes(num_positions: int, bits: int) -> int:
    """Size of ``suffix_array.bin``: the packed entries rounded up to a byte, plus the padding."""
    return (num_positions * bits + 7) // 8 + SA_PAD_BYTES


@dataclass(frozen=True)
class Layout:
    """What the manifest says about the arrays (sizes in elements)."""

    vocab_size: int
    dtype: np.dtype
    num_positions: int  # tokens + separators
    num_tokens: int
    num_docs: int
    shard_starts: tuple[int, ...]  # len num_shards + 1, in positions
    sa_bits: int

    @property
    def num_shards(self) -> int:
        return len(self.shard_starts) - 1

    def expected_bytes(self) -> dict[str, int]:
        return {
            TOKENS_FILE: self.num_positions * self.dtype.itemsize,
            SA_FILE: sa_bytes(self.num_positions, self.sa_bits),
            DOC_STARTS_FILE: (self.num_docs + 1) * 8,
            SHARD_COUNTS_FILE: self.num_shards * (self.vocab_size + 1) * 4,
        }


def layout_from_manifest(manifest: dict[str, Any], directory: Path) -> Layout:
    """Parses and cross-checks the manifest's layout fields; IntegrityError names the problem."""
    where = directory / "manifest.json"
    if manifest.get("format") != FORMAT_NAME:
        raise IntegrityError(f"{where}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(f"{where}: format_version {manifest.get('format_version')} is not supported "
                             f"(this code reads version {FORMAT_VERSION})")
    try:
        layout = Layout(
            vocab_size=int(manifest["vocab_size"]),
            dtype=np.dtype(manifest["token_dtype"]),
            num_positions=int(manifest["num_positions"]),
            num_tokens=int(manifest["num_tokens"]),
            num_docs=int(manifest["num_docs"]),
            shard_starts=tuple(int(x) for x in manifest["shard_starts"]),
            sa_bits=int(manifest["sa_bits"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"{where}: malformed layout field ({err!r})") from err
    if layout.dtype != token_dtype(layout.vocab_size):
        raise IntegrityError(f"{where}: token_dtype {layout.dtype} does not match vocab_size {layout.vocab_size}")
    if layout.num_positions != layout.num_tokens + layout.num_docs:
        raise IntegrityError(f"{where}: num_positions != num_tokens + num_docs")
    if not 1 <= layout.sa_bits <= 31:
        raise IntegrityError(f"{where}: sa_bits {layout.sa_bits} is outside [1, 31]")
    starts = layout.shard_starts
    if starts[0] != 0 or starts[-1] != layout.num_positions or any(b <= a for a, b in zip(starts, starts[1:])):
        raise IntegrityError(f"{where}: shard_starts {list(starts)[:8]}... do not partition the token array")
    files = manifest.get("files", {})
    for name, nbytes in layout.expected_bytes().items():
        if name not in files:
            raise IntegrityError(f"{directory / name}: not listed in the manifest")
        if files[name]["bytes"] != nbytes:
            raise IntegrityError(f"{directory / name}: manifest lists {files[name]['bytes']} bytes, the layout "
                                 f"implies {nbytes}")
    return layout


def memmap(path: Path, dtype: np.dtype | str, count: int) -> np.ndarray:
    """Read-only memory map of ``count`` elements as a plain ndarray (numba takes it as is)."""
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)).view(np.ndarray)
