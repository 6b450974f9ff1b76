"""Random preference pairs in the training layouts, shared by the realign tests."""

from __future__ import annotations

import numpy as np

from tracealign_jax.training.data import build_batch


class RandomPairs:
    """Random prompt / y_w / y_l token ids in [2, vocab), lengths drawn from the half-open ranges, served
    like ``TokenizedPairs`` (``get``, ``lengths``) so ``training.data.build_batch`` lays them out."""

    def __init__(self, num_pairs: int, seed: int, *, vocab: int, prompt_len: tuple[int, int], response_len: tuple[int, int]):
        rng = np.random.default_rng(seed)
        self.ids: dict[str, list[np.ndarray]] = {"prompt": [], "chosen": [], "rejected": []}
        for _ in range(num_pairs):
            self.ids["prompt"].append(rng.integers(2, vocab, size=int(rng.integers(*prompt_len))).astype(np.int32))
            for field in ("chosen", "rejected"):
                self.ids[field].append(rng.integers(2, vocab, size=int(rng.integers(*response_len))).astype(np.int32))

    def get(self, field: str, i: int) -> np.ndarray:
        return self.ids[field][i]

    def lengths(self, field: str) -> np.ndarray:
        return np.asarray([len(x) for x in self.ids[field]], np.int64)


def random_pair_rows(num_pairs: int, length: int, seed: int, *, vocab: int, prompt_len: tuple[int, int],
                     response_len: tuple[int, int], layout: str = "separate") -> dict[str, np.ndarray]:  # fmt: skip
    """``RandomPairs`` as training rows padded to ``length``: separate (rows 2i / 2i+1 = prompt + y_w / y_l
    of pair i: ``tokens`` int32[2N, L], ``positions``, ``valid``, ``loss_mask`` on response tokens) or
    shared_prompt (one row ``[prompt | y_w | y_l]`` per pair, plus ``branch``)."""
    pairs = RandomPairs(num_pairs, seed, vocab=vocab, prompt_len=prompt_len, response_len=response_len)
    batch = build_batch(pairs, np.arange(num_pairs), length, layout=layout)
    return {k: batch[k] for k in ("tokens", "positions", "valid", "loss_mask", "branch") if k in batch}
