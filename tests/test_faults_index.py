"""Faults in index-side artifacts (issue 17 items 2, 3): a flipped byte or a truncation anywhere in an
index is refused by DEFAULT (full SHA-256 on first open, then re-hashing only files whose stat changed)
and by `tracealign index verify`; a veto table likewise; commands that meet an index with data of
another tokenizer refuse it (exit 2), naming what differs."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from tracealign_jax import atomic_io, cli
from tracealign_jax.atomic_io import IntegrityError
from tracealign_jax.index import TraceIndex, build_index_from_tokens
from tracealign_jax.index import format as fmt

FILES = [fmt.TOKENS_FILE, fmt.SA_FILE, fmt.DOC_STARTS_FILE, fmt.SHARD_COUNTS_FILE, fmt.METADATA_FILE]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 40, size=int(n)) for n in rng.integers(1, 30, size=40)]
    path = build_index_from_tokens(docs, tmp_path_factory.mktemp("ix") / "index", vocab_size=40,
                                   metadata=[{"unsafe": bool(i % 3 == 0), "category": "c"} for i in range(40)],
                                   shard_tokens=300)  # fmt: skip
    return path


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built, dst)
    return dst


@pytest.mark.parametrize("name", FILES)
def test_a_flipped_byte_is_refused_by_default(copy, name, capsys):
    TraceIndex.open(copy)  # verified (and remembered) once
    raw = bytearray((copy / name).read_bytes())
    raw[len(raw) // 3] ^= 0x04
    (copy / name).write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=rf"{name.replace('.', '[.]')}: SHA-256 differs"):
        TraceIndex.open(copy)
    assert cli.main(["index", "query", str(copy), "count", "--tokens", "1,2"]) == 2
    assert cli.main(["index", "verify", str(copy)]) == 2
    assert name in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(3))
def test_truncation_at_a_random_offset_is_refused(copy, seed):
    rnd = random.Random(seed)
    name = rnd.choice(FILES)
    raw = (copy / name).read_bytes()
    (copy / name).write_bytes(raw[: rnd.randrange(len(raw))])
    with pytest.raises(IntegrityError, match=rf"{name.replace('.', '[.]')}: .*truncated"):
        TraceIndex.open(copy)


def test_verified_open_is_remembered_and_verify_command(built, copy, monkeypatch, capsys):
    hashed = []
    real = atomic_io.sha256_file
    monkeypatch.setattr(atomic_io, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    TraceIndex.open(built)  # the build remembered its own checksums: nothing to hash
    assert hashed == []
    TraceIndex.open(copy)  # a copy (new inodes) is hashed once ...
    assert sorted(hashed) == sorted(json.loads((copy / "manifest.json").read_text())["files"])
    hashed.clear()
    TraceIndex.open(copy)  # ... then trusted while unchanged
    assert hashed == []
    assert cli.main(["index", "verify", str(copy)]) == 0
    assert "match the manifest" in capsys.readouterr().out
    monkeypatch.setenv("TRACEALIGN_CACHE_DIR", "/proc/no-such-dir")  # unwritable cache: still verifies in full
    hashed.clear()
    TraceIndex.open(copy)
    assert len(hashed) == len(FILES)


def test_a_flipped_byte_in_a_veto_table_is_refused(tmp_path):
    from provenance_corpus import build

    from tracealign_jax.config import ProvenanceConfig
    from tracealign_jax.provenance import BCIScorer, build_veto_table
    from tracealign_jax.veto.store import load_veto_table, save_veto_table

    _, _, index = build(tmp_path)
    cfg = ProvenanceConfig(min_span=3, max_span=6)
    table, meta = build_veto_table(index, BCIScorer(index, cfg), cfg, 1.0)
    save_veto_table(table, tmp_path / "veto", meta=meta)
    load_veto_table(tmp_path / "veto", device=False)
    victim = max((p for p in (tmp_path / "veto").iterdir() if p.suffix == ".bin"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=rf"{victim.name}: SHA-256 differs"):
        load_veto_table(tmp_path / "veto", device=False)
