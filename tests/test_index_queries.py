"""Every TraceIndex query agrees with a naive scan over the documents, on random small corpora.

Each hypothesis example builds a 1-shard and a 3-shard index of the same corpus and checks both
against brute force: spans across document boundaries never match, empty and out-of-vocabulary
queries, queries sorting before / after every suffix (insertion point at rank 0 / rank n).
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracealign_jax.index import Span, TraceIndex, build_index_from_tokens

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive_occurrences(docs: list[list[int]], q: list[int]) -> list[tuple[int, int]]:
    if not q:
        return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc))]
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - len(q) + 1) if doc[i:i + len(q)] == q]


def naive_longest(docs: list[list[int]], tokens: list[int]) -> list[int]:
    out = []
    for i in range(len(tokens)):
        best = 0
        for n in range(1, len(tokens) - i + 1):
            if naive_occurrences(docs, tokens[i:i + n]):
                best = n
            else:
                break
        out.append(best)
    return out


def naive_next(docs: list[list[int]], ctx: list[int]) -> dict[int, int]:
    c = collections.Counter(docs[d][i + len(ctx)] for d, i in naive_occurrences(docs, ctx)
                            if i + len(ctx) < len(docs[d]))
    return dict(c)


@st.composite
def corpora(draw):
    vocab = draw(st.integers(2, 6))
    docs = draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=14), min_size=3, max_size=12))
    total = sum(len(d) + 1 for d in docs)
    queries = draw(st.lists(st.lists(st.integers(-1, vocab + 1), max_size=4), min_size=1, max_size=8))
    # spans straddling a document boundary: end of doc d + start of doc d+1
    for d in range(len(docs) - 1):
        if docs[d] and docs[d + 1]:
            queries.append(docs[d][-2:] + docs[d + 1][:2])
    queries += [[], [0], [vocab - 1] * 3, [0] * 5, [vocab], [vocab - 1, vocab]]
    gen = draw(st.lists(st.integers(0, vocab), min_size=0, max_size=20))
    return vocab, docs, total, queries, gen


def build_pair(tmp: Path, vocab: int, docs: list[list[int]], total: int) -> list[TraceIndex]:
    meta = [{"risk": (d % 5) / 4, "category": f"c{d % 3}", "n": d} for d in range(len(docs))]
    arrays = [np.asarray(d, np.int64) for d in docs]
    one = build_index_from_tokens(arrays, tmp / "one", vocab_size=vocab, metadata=meta)
    three = build_index_from_tokens(arrays, tmp / "three", vocab_size=vocab, metadata=meta,
                                    shard_tokens=max(1, total // 3))
    return [TraceIndex.open(one, verify="full"), TraceIndex.open(three, verify="full")]


@SETTINGS
@given(corpora())
def test_queries_match_naive_scan(case):
    vocab, docs, total, queries, gen = case
    with tempfile.TemporaryDirectory() as tmp:
        indexes = build_pair(Path(tmp), vocab, docs, total)
        assert indexes[1].num_shards >= min(3, len(docs)) - 1
        for ix in indexes:
            assert ix.num_tokens == sum(map(len, docs)) and ix.num_docs == len(docs)
            expected = [len(naive_occurrences(docs, q)) if all(0 <= t < vocab for t in q) else 0 for q in queries]
            assert [ix.count(q) for q in queries] == expected
            assert ix.count_batch(queries).tolist() == expected
            for q, n in zip(queries, expected):
                occ = sorted(naive_occurrences(docs, q)) if n else []
                assert ix.locate(q, limit=10**6) == occ
                some = ix.locate(q, limit=2)
                assert len(some) == min(2, n) and set(some) <= set(occ)
                doc_ids, total_count = ix.occurrence_docs(q, max_samples=10**6)
                assert total_count == n and doc_ids.tolist() == sorted(d for d, _ in occ)
                sample, total_count = ix.occurrence_docs(q, max_samples=3, seed=7)
                assert total_count == n and len(sample) == min(3, n)
                assert set(sample.tolist()) <= {d for d, _ in occ}
                assert np.array_equal(sample, ix.occurrence_docs(q, max_samples=3, seed=7)[0])
                ids, counts = ix.next_token_counts(q)
                want = naive_next(docs, q) if all(0 <= t < vocab for t in q) else {}
                assert dict(zip(ids.tolist(), counts.tolist())) == want
                assert ids.tolist() == sorted(want)
            batched = ix.occurrence_docs_batch(queries, max_samples=10**6)
            assert [t for _, t in batched] == expected
            nxt = ix.next_token_counts_batch(queries)
            assert [dict(zip(i.tolist(), c.tolist())) for i, c in nxt] == [
                dict(zip(*map(np.ndarray.tolist, ix.next_token_counts(q)))) for q in queries]
            _check_generation(ix, docs, gen, vocab)
        # 3 shards answer exactly as 1 shard
        a, b = indexes
        assert a.count_batch(queries).tolist() == b.count_batch(queries).tolist()
        many = queries * (300 // len(queries) + 1)  # >= PARALLEL_MIN_QUERIES: the multi-threaded path
        assert b.count_batch(many).tolist() == expected * (300 // len(queries) + 1)
        assert [t for _, t in b.occurrence_docs_batch(many, 2)] == expected * (300 // len(queries) + 1)
        assert a.maximal_spans(gen) == b.maximal_spans(gen)
        assert np.array_equal(a.unigram_logprobs(), b.unigram_logprobs())


def _check_generation(ix: TraceIndex, docs: list[list[int]], gen: list[int], vocab: int) -> None:
    longest = naive_longest(docs, gen)
    assert ix.longest_matches(gen).tolist() == longest
    assert ix.longest_matches(gen).dtype == np.int32
    logp = ix.unigram_logprobs()
    counts = np.bincount(np.asarray([t for d in docs for t in d], np.int64), minlength=vocab)
    np.testing.assert_allclose(logp, np.log((counts + 0.5) / (sum(map(len, docs)) + 0.5 * vocab)), rtol=1e-12)
    for min_len, max_count in ((1, None), (2, 2)):
        want = []
        for i, n in enumerate(longest):
            contained = any(j + longest[j] >= i + n for j in range(i))
            if n >= min_len and n > 0 and not contained:
                c = len(naive_occurrences(docs, gen[i:i + n]))
                if max_count is None or c <= max_count:
                    want.append(Span(i, i + n, c, float(sum(logp[t] for t in gen[i:i + n]))))
        got = ix.maximal_spans(gen, min_len=min_len, max_count=max_count)
        want = sorted(want, key=lambda s: (round(s.unigram_logprob, 9), s.start))  # rarest first
        assert [(s.start, s.end, s.count) for s in got] == [(s.start, s.end, s.count) for s in want]
        np.testing.assert_allclose([s.unigram_logprob for s in got], [s.unigram_logprob for s in want])


def test_documents_metadata_and_edges(tmp_path):
    docs = [[0, 1, 2], [], [2, 2, 2, 2], [1, 0]]
    meta = [{"unsafe": True, "category": "weapons"}, {"unsafe": False}, {"risk": 0.25, "category": "x", "k": [1]},
            {"risk": 1}]
    ix = TraceIndex.open(build_index_from_tokens([np.asarray(d) for d in docs], tmp_path / "i", vocab_size=4,
                                                 metadata=meta))
    assert ix.doc_unsafe([0, 1, 2, 3]).tolist() == [1.0, 0.0, 0.25, 1.0]
    m = ix.doc_metadata([2, 0])
    assert m[0]["k"] == [1] and m[0]["risk"] == 0.25 and m[0]["doc_id"] == 2 and m[1]["category"] == "weapons"
    assert [ix.doc_tokens(d).tolist() for d in range(4)] == docs
    assert [(d, t.tolist()) for d, t in ix.iter_doc_tokens(unsafe_only=True)] == [(0, [0, 1, 2]), (3, [1, 0])]
    assert [d for d, _ in ix.iter_doc_tokens()] == [0, 1, 2, 3]
    # rank 0 (smallest suffix [0, 1, 2]) and last token-suffix ([2, 2, 2, 2]) edge cases
    assert ix.count([0, 1, 2]) == 1 and ix.count([0, 1, 2, 0]) == 0 and ix.count([0, 0]) == 0
    assert ix.longest_matches([0, 0, 1]).tolist() == [1, 2, 1]
    assert ix.longest_matches([2, 2, 2, 2, 2, 3]).tolist() == [4, 4, 3, 2, 1, 0]
    assert ix.count([2, 2, 2, 2, 2]) == 0 and ix.count([2, 2, 2, 2]) == 1 and ix.count([3]) == 0
    assert ix.count([4]) == 0 and ix.longest_matches([4, 1, 0, 4]).tolist() == [0, 2, 1, 0]
    with pytest.raises(IndexError):
        ix.doc_tokens(4)
    with pytest.raises(ValueError, match=r"metadata\[0\]"):
        build_index_from_tokens([np.asarray([1])], tmp_path / "bad", vocab_size=4, metadata=[{"category": "x"}])
    with pytest.raises(ValueError, match="document 0"):
        build_index_from_tokens([np.asarray([5])], tmp_path / "bad", vocab_size=4, metadata=[{"unsafe": True}])
    assert not (tmp_path / "bad").exists()


def test_uint32_tokens_and_wide_vocab(tmp_path):
    rng = np.random.default_rng(0)
    vocab = 70_000
    docs = [rng.integers(vocab - 4, vocab, size=n) for n in (5, 9, 1, 7)]
    ix = TraceIndex.open(build_index_from_tokens(docs, tmp_path / "i", vocab_size=vocab,
                                                 metadata=[{"unsafe": False}] * 4, shard_tokens=8))
    assert ix.manifest["token_dtype"] == "<u4" and ix.num_shards >= 2
    flat = [list(d) for d in docs]
    queries = [[vocab - 1], [vocab - 2, vocab - 1], [vocab], [vocab - 4, vocab - 4], []]
    want = [len(naive_occurrences(flat, [int(x) for x in q])) if all(t < vocab for t in q) else 0 for q in queries]
    assert ix.count_batch(queries).tolist() == want
    ids, counts = ix.next_token_counts([vocab - 1])
    assert dict(zip(ids.tolist(), counts.tolist())) == naive_next([[int(x) for x in d] for d in docs], [vocab - 1])


def test_long_query_split_across_threads(tmp_path):
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 4, size=int(n)).tolist() for n in rng.integers(5, 60, size=12)]
    ix = TraceIndex.open(build_index_from_tokens([np.asarray(d) for d in docs], tmp_path / "i", vocab_size=4,
                                                 metadata=[{"unsafe": False}] * len(docs), shard_tokens=150))
    gen = rng.integers(0, 5, size=200).tolist()  # >= SPLIT_MIN_TOKENS: positions split over the pool
    longest = ix.longest_matches(gen)
    assert longest.dtype == np.int32 and longest.tolist() == naive_longest(docs, gen)
    assert np.array_equal(longest, ix.longest_matches_batch([gen])[0])
    for min_len, max_count in ((1, None), (3, 4)):
        assert ix.maximal_spans(gen, min_len, max_count) == ix.maximal_spans_batch([gen], min_len, max_count)[0]
    spans = ix.maximal_spans(gen)
    assert spans and all(s.count == len(naive_occurrences(docs, gen[s.start:s.end])) for s in spans)


def test_alphabetic_code_is_order_preserving_and_prefix_free():
    from tracealign_jax.index.build import alphabetic_code

    rng = np.random.default_rng(1)
    for n_sym in (257, 300, 32001, 65536):
        fb, sb = alphabetic_code(rng.zipf(1.3, n_sym))
        codes = [(int(f),) if b < 0 else (int(f), int(b)) for f, b in zip(fb, sb)]
        assert codes == sorted(codes) and len(set(codes)) == n_sym  # strictly increasing with the id
        assert 0 <= fb.min() and fb.max() <= 255 and sb.max() <= 255
        one_byte = {c[0] for c in codes if len(c) == 1}
        assert not any(len(c) == 2 and c[0] in one_byte for c in codes)  # no code is a prefix of another
    assert alphabetic_code(np.ones(65537, np.int64)) is None


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(257, 5000), st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_coded_sort_over_wide_vocab_matches_naive(vocab, seed, n_shards):
    """Shards whose ids reach 256 are sorted as 1-2 byte codes: the packed suffix array must still
    sort every shard's suffixes, and counts must match a scan (frequent ids get one-byte codes)."""
    rng = np.random.default_rng(seed)
    frequent = rng.integers(0, vocab, 6)
    docs = [np.where(rng.random(n) < 0.6, rng.choice(frequent, n), rng.integers(0, vocab, n))
            for n in rng.integers(0, 40, 25)]
    docs[0] = np.append(docs[0], vocab - 1)  # the largest id is in the corpus
    total = sum(len(d) + 1 for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        ix = TraceIndex.open(build_index_from_tokens(docs, Path(tmp) / "i", vocab_size=vocab,
                                                     metadata=[{"unsafe": False}] * len(docs),
                                                     shard_tokens=-(-total // n_shards)), verify="full")
        m = ix.manifest
        raw = ix._a.tokens
        stream = np.unpackbits(np.asarray(ix._a.sa_u8), bitorder="little")
        bits = m["sa_bits"]
        sa = stream[:len(raw) * bits].reshape(-1, bits).astype(np.int64) @ 2 ** np.arange(bits)
        for a, b in zip(m["shard_starts"][:-1], m["shard_starts"][1:]):
            assert sorted(sa[a:b]) == list(range(b - a))
            suffixes = [tuple(raw[a + p:b].tolist()) for p in sa[a:b]]
            assert suffixes == sorted(suffixes)
        lists = [d.tolist() for d in docs]
        queries = [lists[0][i:i + k] for i in range(0, max(len(lists[0]) - 3, 1), 3) for k in (1, 2, 3)]
        queries += [rng.choice(frequent, int(k)).tolist() for k in rng.integers(1, 4, 20)]
        expected = [len(naive_occurrences(lists, q)) for q in queries]
        assert [ix.count(q) for q in queries] == expected
        assert ix.count_batch(queries * 40).tolist() == expected * 40


def _scan_count(flat: np.ndarray, q: list[int]) -> int:
    """Occurrences of q in the separator-joined token array (separators never equal a query id)."""
    if not q:
        return int((flat >= 0).sum())
    if len(q) > len(flat):
        return 0
    windows = np.lib.stride_tricks.sliding_window_view(flat, len(q))
    return int((windows == np.asarray(q)).all(axis=1).sum())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 5), st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_large_blocks_fence_and_lanes_match_scan(vocab, seed, n_shards):
    """First-token blocks of hundreds of suffixes: searches narrow through the fence samples and
    run interleaved in lanes; counts, batches, longest matches and next tokens still equal a scan."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, int(n)) for n in rng.integers(0, 120, 40)]
    flat = np.concatenate([np.append(d, -1) for d in docs])  # -1 stands for the separator
    total = len(flat)
    with tempfile.TemporaryDirectory() as tmp:
        ix = TraceIndex.open(build_index_from_tokens(docs, Path(tmp) / "i", vocab_size=vocab,
                                                     metadata=[{"unsafe": False}] * len(docs),
                                                     shard_tokens=-(-total // n_shards)))
        queries = [rng.integers(0, vocab, int(k)).tolist() for k in rng.integers(0, 9, 150)]
        queries += [flat[i:i + k].tolist() for i, k in zip(rng.integers(0, total - 8, 100), rng.integers(2, 8, 100))
                    if -1 not in flat[i:i + k]]
        expected = [_scan_count(flat, q) for q in queries]
        assert [ix.count(q) for q in queries] == expected
        assert ix.count_batch(queries).tolist() == expected
        assert ix.count_batch(queries * 3).tolist() == expected * 3  # chunked, sorted, repeats
        assert [t for _, t in ix.occurrence_docs_batch(queries, 5)] == expected
        for q in queries[:40]:
            ids, counts = ix.next_token_counts(q)
            want = {t: _scan_count(flat, q + [t]) for t in range(vocab)}
            assert dict(zip(ids.tolist(), counts.tolist())) == {t: c for t, c in want.items() if c}
        gen = rng.integers(0, vocab + 1, 150).tolist()  # includes out-of-vocabulary ids
        longest = []
        for i in range(len(gen)):
            n = 0
            while i + n < len(gen) and gen[i + n] < vocab and _scan_count(flat, gen[i:i + n + 1]):
                n += 1
            longest.append(n)
        assert ix.longest_matches(gen).tolist() == longest  # split across threads (>= 128 tokens)
        assert ix.longest_matches_batch([gen[:60], gen[60:]])[1].tolist() == ix.longest_matches(gen[60:]).tolist()
        spans = ix.maximal_spans(gen)
        assert spans and all(s.count == _scan_count(flat, gen[s.start:s.end]) for s in spans)
