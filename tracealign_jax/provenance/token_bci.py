"""Per-token BCI of the responses of a tokenized preference set (host side, needs a scorer).

For example i and response r in {chosen, rejected}, ``bci[i, t]`` is the largest BCI (nats) of a
high-BCI corpus span (BCI > tau) covering response token t, and 0 elsewhere; the spans are the
response's maximal corpus matches of >= ``min_span`` tokens, exactly those TraceShield scores. Stored
with ``tracealign_jax.response_store``, they feed the CBD data term without index access under jit.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tracealign_jax.response_store import RESPONSES


def token_bci_from_spans(length: int, spans: Sequence[Any], tau: float) -> np.ndarray:
    """float32[length]: per token the max BCI of spans with BCI > tau covering it (0 elsewhere).

    spans: objects with ``start``, ``end`` (exclusive, token offsets) and ``bci`` (nats).
    """
    out = np.zeros(length, dtype=np.float32)
    for s in spans:
        if s.bci > tau:
            seg = out[s.start:s.end]
            np.maximum(seg, np.float32(s.bci), out=seg)
    return out


def compute_token_bci(scorer: Any, responses: Sequence[Sequence[int]], tau: float) -> list[np.ndarray]:
    """Per-token BCI of each response via ``scorer.scan_batch`` (maximal corpus spans, scored)."""
    scanned = scorer.scan_batch([np.asarray(r, dtype=np.int64) for r in responses])
    return [token_bci_from_spans(len(r), spans, tau) for r, spans in zip(responses, scanned)]


def token_bci_for_pairs(scorer: Any, pairs: Any, tau: float, *, batch: int = 256,
                        progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-token BCI of every (chosen, rejected) response of a tokenized preference set.

    pairs: ``len(pairs)`` examples with ``pairs.get("chosen" | "rejected", i) -> int[T]`` (the
    training pipeline's ``TokenizedPairs``); the arrays align with those stored response tokens.
    In a multi-process run each process scores its slice of the examples (``multihost.process_slice``)
    against its own (memory-mapped) index and every process returns all of them.
    """
    from tqdm import tqdm

    from tracealign_jax.multihost import allgather_ragged, process_slice

    mine = process_slice(len(pairs))
    local: list[np.ndarray] = []
    for s in tqdm(range(mine.start, mine.stop, batch), desc="per-token BCI", disable=not progress):
        responses = [pairs.get(r, i) for i in range(s, min(s + batch, mine.stop)) for r in RESPONSES]
        local.extend(compute_token_bci(scorer, responses, tau))
    arrays = allgather_ragged(local, np.float32)
    return [(arrays[2 * j], arrays[2 * j + 1]) for j in range(len(arrays) // 2)]
