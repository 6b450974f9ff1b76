"""The decoding step's lookup path equals provenance's reference lookup.

``veto_candidates`` (raw slots, through the bucket directory or not) carries exactly the tokens and
max penalties of ``veto_entries``; the directory search equals ``searchsorted`` (including the
fallback for an oversized bucket); the veto hook (hard and soft, hits in some rows, in none) equals
the dense form built from ``veto_penalties``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.veto_dense import veto_penalties
from tracealign_jax.decoding.step import NEG_INF
from tracealign_jax.decoding.veto_hook import VetoSpec, make_veto_hook
from tracealign_jax.veto.store import compile_veto_table
from tracealign_jax.veto.table import _directory, _lower_bound, bucket_directory, veto_candidates, veto_entries

VOCAB, MAX_SPAN, MAX_ENTRIES, C = 20, 6, 3, 5


def _table_and_contexts(seed: int, n_spans: int, b: int):
    rng = np.random.default_rng(seed)
    spans = [(rng.integers(0, VOCAB, size=rng.integers(2, MAX_SPAN + 2)), float(rng.uniform(0.5, 30.0)))
             for _ in range(n_spans)]
    table = jax.tree.map(jnp.asarray, compile_veto_table(spans, max_span=MAX_SPAN, max_entries=MAX_ENTRIES))
    ctx = rng.integers(0, VOCAB, size=(b, C)).astype(np.int32)
    lens = rng.integers(0, C + 1, size=b).astype(np.int32)
    for i in range(0, b, 2):  # half the rows end in a span prefix, so they hit
        toks, _ = spans[rng.integers(len(spans))]
        k = int(rng.integers(1, min(len(toks), MAX_SPAN)))
        ctx[i, C - k:] = toks[:k]
        lens[i] = max(lens[i], k)
    return table, jnp.asarray(ctx), jnp.asarray(lens)


def _as_dicts(tok, pen, valid) -> list[dict[int, float]]:
    out = []
    for t_row, p_row, v_row in zip(np.asarray(tok), np.asarray(pen), np.asarray(valid)):
        d: dict[int, float] = {}
        for t, p in zip(t_row[v_row].tolist(), p_row[v_row].tolist()):
            d[t] = max(d.get(t, 0.0), p)
        out.append(d)
    return out


@pytest.mark.parametrize("seed,min_prefix", [(0, 1), (1, 2)])
def test_candidates_carry_the_entries_of_veto_entries(seed, min_prefix):
    table, ctx, lens = _table_and_contexts(seed, 400, 64)
    want = _as_dicts(*jax.jit(veto_entries, static_argnums=(3,))(table, ctx, lens, min_prefix))
    assert sum(len(d) for d in want) > 40  # the lookups do hit
    cands = jax.jit(veto_candidates, static_argnums=(3,))
    for directory in (None, jax.jit(bucket_directory)(table)):
        assert _as_dicts(*cands(table, ctx, lens, min_prefix, directory)) == want


def test_directory_search_equals_searchsorted():
    rng = np.random.default_rng(3)
    n = 2048  # one shape for every case: one compile
    arrays = [
        np.sort(rng.integers(0, 2**32, size=n, dtype=np.uint64)).astype(np.uint32),
        np.sort(np.repeat(rng.integers(0, 2**32, size=n // 4, dtype=np.uint64), 4)).astype(np.uint32),  # equal runs
        np.sort(rng.integers(0, 2**16, size=n, dtype=np.uint64)).astype(np.uint32),  # one crowded bucket
    ]
    search = jax.jit(_lower_bound)
    for hi in arrays:
        q = np.concatenate([hi, hi - 1, hi + 1, [0, 2**32 - 1],
                            rng.integers(0, 2**32, size=510, dtype=np.uint64)]).astype(np.uint32)
        directory = _directory(jnp.asarray(hi))
        got = np.asarray(search(jnp.asarray(hi), jnp.asarray(q), directory))
        np.testing.assert_array_equal(got, np.searchsorted(hi, q, side="left"))
    sizes = np.diff(np.asarray(_directory(jnp.asarray(arrays[2]))))
    assert sizes.max() >= 16  # the crowded case really takes the full-search fallback


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_hook_equals_dense_penalties(mode):
    table, ctx, lens = _table_and_contexts(4, 300, 16)
    spec = VetoSpec(mode=mode, gamma=0.5, tau=8.0, min_prefix=1, context_len=MAX_SPAN - 1)
    rng = np.random.default_rng(5)
    scores = jnp.asarray(rng.normal(size=(16, VOCAB)).astype(np.float32))
    # second batch: the same rows with contexts nothing in the table ends with (the skip branch)
    quiet = jnp.full_like(ctx, VOCAB + 3)

    @jax.jit
    def run(table, scores, ctx, lens):
        return make_veto_hook(spec, table)(scores, ctx, lens)

    for c in (ctx, quiet):
        pen = np.asarray(veto_penalties(table, c, lens, VOCAB, 1))
        hit = pen > spec.tau
        if mode == "hard":
            want = np.where(hit, NEG_INF, np.asarray(scores))
        else:
            want = np.asarray(scores) - np.where(hit, spec.gamma * pen, 0.0)
        got, count = run(table, scores, c, lens)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(count), hit.sum(axis=1))
        if c is ctx:
            assert hit.any(axis=1).sum() >= 3 and not hit.all()
        else:
            assert not hit.any()
