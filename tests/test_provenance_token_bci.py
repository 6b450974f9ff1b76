"""Per-token BCI arrays: span -> token projection against a brute-force loop; tensorstore round-trip
for a local path and a ``file://`` URL, batched reads of arbitrary indices, overwrite protection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tracealign_jax.provenance.token_bci import token_bci_from_spans
from tracealign_jax.response_store import ResponseArrayReader, write_response_arrays


@dataclasses.dataclass
class _S:
    start: int
    end: int
    bci: float


def test_token_projection_is_max_over_covering_high_spans():
    rng = np.random.default_rng(0)
    for _ in range(50):
        length = int(rng.integers(1, 30))
        spans = []
        for _ in range(int(rng.integers(0, 6))):
            a = int(rng.integers(0, length))
            spans.append(_S(a, int(rng.integers(a + 1, length + 1)), float(rng.uniform(0, 40))))
        tau = 15.0
        want = [max([s.bci for s in spans if s.start <= t < s.end and s.bci > tau], default=0.0) for t in range(length)]
        np.testing.assert_allclose(token_bci_from_spans(length, spans, tau), np.float32(want))


@pytest.mark.parametrize("as_url", [False, True])
def test_roundtrip_through_tensorstore(tmp_path, as_url):
    rng = np.random.default_rng(1)
    examples = [(rng.uniform(0, 30, int(rng.integers(0, 40))).astype(np.float32),
                 rng.uniform(0, 30, int(rng.integers(1, 40))).astype(np.float32)) for _ in range(37)]
    path = f"file://{tmp_path}/bci" if as_url else str(tmp_path / "bci")
    write_response_arrays(path, examples, chunk_examples=8, meta={"tau": 12.5, "index_hash": "h"})
    reader = ResponseArrayReader(path)
    assert len(reader) == 37 and reader.meta["tau"] == 12.5 and reader.meta["index_hash"] == "h"
    idx = [36, 0, 5, 5, 17]
    chosen, rejected = reader.read(idx)
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(chosen[j], examples[i][0])
        np.testing.assert_array_equal(rejected[j], examples[i][1])
    padded = reader.read_padded(idx)
    assert padded["chosen"].shape == (5, reader.max_len)
    assert np.all(padded["chosen"][1, len(examples[0][0]):] == 0)
    with pytest.raises(FileExistsError):
        write_response_arrays(path, examples)
    write_response_arrays(path, examples[:3], overwrite=True)
    assert len(ResponseArrayReader(path)) == 3
    with pytest.raises(IndexError):
        ResponseArrayReader(path).read([3])
