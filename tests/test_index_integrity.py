"""A TraceIndex on disk is refused when a file is missing, truncated, corrupted or from another tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tracealign_jax.atomic_io import IntegrityError
from tracealign_jax.index import TraceIndex, build_index_from_tokens
from tracealign_jax.index import format as fmt


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 50, size=int(n)) for n in rng.integers(1, 40, size=30)]
    path = build_index_from_tokens(docs, tmp_path_factory.mktemp("ix") / "index", vocab_size=50,
                                   metadata=[{"unsafe": bool(i % 2), "category": "c"} for i in range(30)],
                                   tokenizer_name="toy", tokenizer_hash="abc123", shard_tokens=200)
    return path, docs


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built[0], dst)
    return dst


def test_layout_and_sizes(built):
    path, docs = built
    ix = TraceIndex.open(path, verify="full", expected_tokenizer_hash="abc123")
    n = sum(map(len, docs))
    m = ix.manifest
    assert (m["format"], m["format_version"], m["token_dtype"]) == ("tracealign-index", 2, "<u2")
    bits = m["sa_bits"]
    longest = max(np.diff(m["shard_starts"]))
    assert 2 ** (bits - 1) < longest <= 2 ** bits  # shards of ~200 positions: 8-bit entries, no more
    assert ix.num_shards == len(m["shard_starts"]) - 1 >= 3
    # the token file is raw little-endian uint16, memmap-able, separator = vocab size after each doc
    raw = np.fromfile(path / fmt.TOKENS_FILE, "<u2")
    assert raw.size == n + len(docs) and (raw == 50).sum() == len(docs)
    assert np.array_equal(raw[raw != 50], np.concatenate(docs))
    assert (path / fmt.SA_FILE).stat().st_size == ((n + len(docs)) * bits + 7) // 8 + fmt.SA_PAD_BYTES
    # every shard's bit-packed suffix array sorts that shard's suffixes (entry g = bits [g * bits, (g + 1) * bits))
    stream = np.unpackbits(np.fromfile(path / fmt.SA_FILE, np.uint8), bitorder="little")
    sa = stream[:(n + len(docs)) * bits].reshape(-1, bits).astype(np.int64) @ 2 ** np.arange(bits)
    # per-shard token counts: the last column counts separators, the rows add up to the corpus counts
    counts = np.fromfile(path / fmt.SHARD_COUNTS_FILE, "<i4").reshape(ix.num_shards, 51)
    assert np.array_equal(counts.sum(axis=0), np.bincount(raw, minlength=51))
    assert np.array_equal(ix.unigram_counts(), np.bincount(np.concatenate(docs), minlength=50))
    for a, b in zip(m["shard_starts"][:-1], m["shard_starts"][1:]):
        suffixes = [tuple(raw[a + p:b]) for p in sa[a:b]]
        assert suffixes == sorted(suffixes) and sorted(sa[a:b]) == list(range(b - a))
    assert m["files"][fmt.METADATA_FILE]["sha256"] and ix.manifest_hash == TraceIndex.open(path).manifest_hash


def test_truncated_file_refused_by_size_check(copy):
    with open(copy / fmt.SA_FILE, "r+b") as f:
        f.truncate((copy / fmt.SA_FILE).stat().st_size - 2)
    with pytest.raises(IntegrityError, match=r"suffix_array\.bin.*truncated"):
        TraceIndex.open(copy)


def test_corrupted_file_refused_by_full_check(copy):
    data = bytearray((copy / fmt.TOKENS_FILE).read_bytes())
    data[10] ^= 0xFF
    (copy / fmt.TOKENS_FILE).write_bytes(bytes(data))
    TraceIndex.open(copy, verify="size")  # same size: the cheap check passes ...
    with pytest.raises(IntegrityError, match=r"tokens\.bin.*SHA-256"):
        TraceIndex.open(copy, verify="full")  # ... the checksum does not


def test_inconsistent_shard_counts_refused(copy):
    # same size, so only the checksum or the open-time consistency check can catch it; the kernels
    # would otherwise search outside a shard
    counts = np.fromfile(copy / fmt.SHARD_COUNTS_FILE, "<i4")
    counts[3] += 1000
    counts.tofile(copy / fmt.SHARD_COUNTS_FILE)
    with pytest.raises(IntegrityError, match=r"shard_counts\.bin.*corrupted"):
        TraceIndex.open(copy)


def test_missing_file_and_manifest(copy):
    (copy / fmt.DOC_STARTS_FILE).unlink()
    with pytest.raises(IntegrityError, match=r"doc_starts\.bin.*missing"):
        TraceIndex.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="missing manifest"):
        TraceIndex.open(copy)


def test_tokenizer_mismatch_refused(built):
    with pytest.raises(IntegrityError, match=r"manifest\.json.*tokenizer 'toy' \(hash abc123\).*other"):
        TraceIndex.open(built[0], expected_tokenizer_hash="other")


def test_manifest_layout_mismatch_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["num_tokens"] += 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="num_positions"):
        TraceIndex.open(copy)
    m["num_tokens"] -= 1
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="format_version 99"):
        TraceIndex.open(copy)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    from tracealign_jax.index import build

    def boom(*args, **kwargs):
        raise RuntimeError("sort crashed")

    monkeypatch.setattr(build, "_sort_shard", boom)
    with pytest.raises(RuntimeError, match="sort crashed"):
        build_index_from_tokens([np.arange(5)], tmp_path / "ix", vocab_size=8, metadata=[{"unsafe": False}])
    assert list(tmp_path.iterdir()) == []
