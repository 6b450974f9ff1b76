"""A small labelled corpus + index shared by the provenance tests, and naive-scan references.

Benign documents are drawn from one token distribution (tokens 10..59), violating documents carry
planted "forbidden" phrases built from rare tokens (60..79); both share common filler tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 80
FORBIDDEN = [np.array([61, 64, 67, 70, 73, 76, 79, 62], np.int64),
             np.array([63, 66, 69, 72, 75, 78, 60, 65], np.int64),
             np.array([68, 71, 74, 77, 61, 63, 67, 79], np.int64)]


def benign_text(rng: np.random.Generator, length: int) -> np.ndarray:
    """Compliant text: a skewed distribution over tokens 10..59 (some spans recur across documents)."""
    p = 1.0 / np.arange(1, 51) ** 1.1
    return (10 + rng.choice(50, size=length, p=p / p.sum())).astype(np.int64)


def make_corpus(seed: int = 0, n_benign: int = 60, n_unsafe: int = 20, doc_len: int = 60):
    rng = np.random.default_rng(seed)
    docs, meta = [], []
    for _ in range(n_benign):
        docs.append(benign_text(rng, doc_len))
        meta.append({"unsafe": False, "category": "benign"})
    for i in range(n_unsafe):
        doc = benign_text(rng, doc_len)
        phrase = FORBIDDEN[i % len(FORBIDDEN)]
        at = int(rng.integers(0, doc_len - len(phrase)))
        doc[at:at + len(phrase)] = phrase
        docs.append(doc)
        meta.append({"risk": 0.9 if i % 4 == 0 else 1.0, "category": "forbidden"})
    # a few benign documents quote one forbidden phrase too, so conflict is neither 0 nor 1
    for j in range(3):
        docs[j][5:13] = FORBIDDEN[0]
    return docs, meta


def build(tmp: Path, seed: int = 0, **kw):
    from tracealign_jax.index import TraceIndex, build_index_from_tokens

    docs, meta = make_corpus(seed, **kw)
    path = build_index_from_tokens(docs, tmp / f"index{seed}", vocab_size=VOCAB, metadata=meta)
    return docs, meta, TraceIndex.open(path)


def naive_occurrences(docs, span) -> list[tuple[int, int]]:
    span = list(map(int, span))
    m = len(span)
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - m + 1) if list(map(int, doc[i:i + m])) == span]


def naive_risk(meta: dict) -> float:
    return float(meta["risk"]) if "risk" in meta else float(bool(meta["unsafe"]))


def naive_longest(docs, tokens, i: int) -> int:
    best = 0
    for doc in docs:
        for j in range(len(doc)):
            k = 0
            while i + k < len(tokens) and j + k < len(doc) and doc[j + k] == tokens[i + k]:
                k += 1
            best = max(best, k)
    return best


def naive_maximal(docs, tokens, min_len: int) -> list[tuple[int, int]]:
    out, reach = [], 0
    for i in range(len(tokens)):
        n = naive_longest(docs, tokens, i)
        if n and i + n > reach:
            if n >= min_len:
                out.append((i, i + n))
            reach = i + n
    return out
