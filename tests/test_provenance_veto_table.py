"""Veto table: jitted lookups equal a Python dict built from the same spans (1 and 8 devices);
a collision of the 64-bit key alone is never acted on; save/load round-trips and detects corruption."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.veto_dense import apply_veto, veto_penalties
from tracealign_jax.atomic_io import IntegrityError
from tracealign_jax.config import MeshConfig
from tracealign_jax.sharding import build_mesh, named_sharding, resolve_rules
from tracealign_jax.veto import context_hash
from tracealign_jax.veto.store import _from_sorted_entries, compile_veto_table, load_veto_table, save_veto_table
from tracealign_jax.veto.table import unique_slots, veto_candidates, veto_entries

VOCAB, MAX_SPAN, MAX_ENTRIES, C = 24, 6, 3, 7


def _spans(seed: int, n: int) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, size=rng.integers(2, MAX_SPAN + 3)), float(rng.uniform(0.5, 30.0)))
            for _ in range(n)]


def _reference_dict(spans) -> dict[tuple[int, ...], dict[int, float]]:
    """context tuple -> {next token: max penalty}, capped to the MAX_ENTRIES largest penalties."""
    d: dict[tuple[int, ...], dict[int, float]] = {}
    for toks, bci in spans:
        toks = [int(t) for t in toks[:MAX_SPAN]]
        for k in range(1, len(toks)):
            nxt = d.setdefault(tuple(toks[:k]), {})
            nxt[toks[k]] = max(nxt.get(toks[k], 0.0), np.float32(bci))
    return {ctx: dict(sorted(n.items(), key=lambda kv: -kv[1])[:MAX_ENTRIES]) for ctx, n in d.items()}


def _reference_lookup(d, ctx_row: list[int], min_prefix: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for k in range(min_prefix, min(len(ctx_row), MAX_SPAN - 1) + 1):
        for tok, pen in d.get(tuple(ctx_row[len(ctx_row) - k:]), {}).items():
            out[tok] = max(out.get(tok, 0.0), pen)
    return out


def _contexts(spans, seed: int, b: int) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Right-aligned contexts: half end in a span prefix (so they hit), half random."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, VOCAB, size=(b, C)).astype(np.int32)
    lens = rng.integers(0, C + 1, size=b).astype(np.int32)
    for i in range(0, b, 2):
        toks, _ = spans[rng.integers(len(spans))]
        k = int(rng.integers(1, max(2, min(len(toks), MAX_SPAN))))
        ctx[i, C - k:] = toks[:k]
        lens[i] = max(lens[i], k)
    rows = [list(map(int, ctx[i, C - lens[i]:])) if lens[i] else [] for i in range(b)]
    ctx[np.arange(C)[None, :] < (C - lens)[:, None]] = 0  # padding columns are arbitrary; zero them
    return ctx, lens, rows


@pytest.fixture(scope="module")
def built():
    spans = _spans(0, 300)
    table = compile_veto_table(spans, max_span=MAX_SPAN, max_entries=MAX_ENTRIES)
    return spans, jax.tree.map(jnp.asarray, table), _reference_dict(spans)


def test_host_and_device_hashes_agree():
    rng = np.random.default_rng(1)
    ctx = rng.integers(0, 50_000, size=(16, C)).astype(np.int32)
    hi, lo, chk = jax.jit(context_hash.suffix_hashes)(jnp.asarray(ctx))
    for k in range(1, C + 1):
        h_np = context_hash.hash_contexts_np(ctx[:, C - k:])
        np.testing.assert_array_equal(np.asarray(hi[:, k - 1]), h_np[0])
        np.testing.assert_array_equal(np.asarray(lo[:, k - 1]), h_np[1])
        np.testing.assert_array_equal(np.asarray(chk[:, k - 1]), h_np[2])


@pytest.mark.parametrize("min_prefix", [1, 2])
def test_jitted_lookup_equals_python_dict(built, min_prefix):
    spans, table, ref = built
    ctx, lens, rows = _contexts(spans, seed=min_prefix, b=64)
    pen_BxV = jax.jit(veto_penalties, static_argnums=(3, 4))(table, jnp.asarray(ctx), jnp.asarray(lens), VOCAB,
                                                            min_prefix)
    tok, pen, valid = jax.jit(veto_entries, static_argnums=(3,))(table, jnp.asarray(ctx), jnp.asarray(lens), min_prefix)
    c_tok, c_pen, c_ok = jax.jit(veto_candidates, static_argnums=(3,))(table, jnp.asarray(ctx), jnp.asarray(lens), min_prefix)
    c_ok = jax.jit(unique_slots)(c_tok, c_pen, c_ok)
    hits = 0
    for i, row in enumerate(rows):
        want = _reference_lookup(ref, row, min_prefix)
        hits += bool(want)
        dense = np.zeros(VOCAB, np.float32)
        for t, p in want.items():
            dense[t] = p
        np.testing.assert_array_equal(np.asarray(pen_BxV[i]), dense)
        got = {int(t): float(p) for t, p, v in zip(tok[i], pen[i], valid[i]) if v}
        assert got == {t: float(p) for t, p in want.items()}  # each token once, max penalty
        kept = [(int(t), float(p)) for t, p, v in zip(c_tok[i], c_pen[i], c_ok[i]) if v]
        assert dict(kept) == got and len(kept) == len(got)  # the unsorted dedup keeps the same slots
    assert hits >= 20  # the test exercises real hits, not only misses
    if min_prefix != 1:
        return  # one compile of apply_veto is enough
    logits = jnp.asarray(np.random.default_rng(9).normal(size=(64, VOCAB)).astype(np.float32))
    vetoed = jax.jit(apply_veto, static_argnums=(5,))(logits, table, jnp.asarray(ctx), jnp.asarray(lens), 0.5,
                                                     min_prefix)
    np.testing.assert_allclose(np.asarray(vetoed), np.asarray(logits - 0.5 * pen_BxV), rtol=1e-6, atol=1e-6)


def test_lookup_on_8_devices_matches_single_device(built):
    assert jax.device_count() == 8
    spans, table, _ = built
    ctx, lens, _ = _contexts(spans, seed=7, b=64)
    mesh = build_mesh(MeshConfig(data=-1))
    rules = resolve_rules("fsdp_tp")
    ctx_s = jax.device_put(jnp.asarray(ctx), named_sharding(mesh, rules, ("batch", None)))
    lens_s = jax.device_put(jnp.asarray(lens), named_sharding(mesh, rules, ("batch",)))
    table_r = jax.device_put(table, named_sharding(mesh, rules, (None,)))
    fn = jax.jit(veto_penalties, static_argnums=(3, 4))
    sharded = fn(table_r, ctx_s, lens_s, VOCAB, 1)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(fn(table, jnp.asarray(ctx), jnp.asarray(lens), VOCAB, 1)))


def test_primary_key_collision_is_not_acted_on():
    ctx_tokens = np.array([[5, 9, 2]], np.int32)
    hi, lo, chk = context_hash.hash_contexts_np(ctx_tokens)
    # A foreign context forced to share the 64-bit (hi, lo) key, with a different check hash.
    fake_chk = chk ^ np.uint32(0x5A5A5A5A)
    keys = np.array([chk[0], fake_chk[0]], np.uint32)
    order = np.argsort(keys)
    table = _from_sorted_entries(np.repeat(hi, 2), np.repeat(lo, 2), keys[order],
                                 np.array([7, 11], np.int32)[order], np.array([3.0, 50.0], np.float32)[order],
                                 context_len=3, max_entries=2)
    assert table.hi_run == 2
    table = jax.tree.map(jnp.asarray, table)
    pen = np.asarray(veto_penalties(table, jnp.asarray(ctx_tokens), jnp.array([3]), 16, 3))
    assert pen[0, 7] == 3.0 and pen[0, 11] == 0.0  # only the true context's entry
    # Now only the impostor remains: same (hi, lo), wrong check hash -> nothing is vetoed.
    impostor = jax.tree.map(jnp.asarray, _from_sorted_entries(hi, lo, fake_chk, np.array([11], np.int32),
                                                              np.array([50.0], np.float32), 3, 2))
    assert float(jnp.max(veto_penalties(impostor, jnp.asarray(ctx_tokens), jnp.array([3]), 16, 3))) == 0.0


def test_save_load_roundtrip_and_corruption(built, tmp_path):
    spans, table, _ = built
    out = save_veto_table(table, tmp_path / "veto", meta={"index_hash": "abc"})
    loaded, meta = load_veto_table(out)
    assert meta == {"index_hash": "abc"} and loaded.hi_run == table.hi_run
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(table)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    raw = bytearray((out / "penalties.bin").read_bytes())
    raw[0] ^= 1
    (out / "penalties.bin").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        load_veto_table(out)


def test_empty_table_vetoes_nothing():
    table = jax.tree.map(jnp.asarray, compile_veto_table([], max_span=4, max_entries=2))
    pen = veto_penalties(table, jnp.zeros((2, 3), jnp.int32), jnp.array([3, 0]), 8, 1)
    assert float(jnp.max(pen)) == 0.0
