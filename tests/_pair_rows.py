"""Random preference pairs in the training layout, shared by the realign tests."""

from __future__ import annotations

import numpy as np


def random_pair_rows(num_pairs: int, length: int, seed: int, *, vocab: int, prompt_len: tuple[int, int],
                     response_len: tuple[int, int]) -> dict[str, np.ndarray]:
    """Rows 2i / 2i+1 = prompt + y_w / y_l of pair i, right-padded to ``length``: ``tokens`` int32[2N, L],
    ``positions`` int32[2N, L], ``valid`` bool[2N, L], ``loss_mask`` float32[2N, L] (response tokens).
    Token ids in [2, vocab); lengths drawn from the half-open ranges."""
    rng = np.random.default_rng(seed)
    tok = np.zeros((2 * num_pairs, length), np.int32)
    valid = np.zeros((2 * num_pairs, length), bool)
    mask = np.zeros((2 * num_pairs, length), np.float32)
    for i in range(num_pairs):
        prompt = rng.integers(2, vocab, size=int(rng.integers(*prompt_len)))
        for j in range(2):
            resp = rng.integers(2, vocab, size=int(rng.integers(*response_len)))
            p, n = len(prompt), len(resp)
            tok[2 * i + j, :p], tok[2 * i + j, p:p + n] = prompt, resp
            valid[2 * i + j, :p + n] = True
            mask[2 * i + j, p:p + n] = 1.0
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), tok.shape).copy()
    return {"tokens": tok, "positions": pos, "valid": valid, "loss_mask": mask}
