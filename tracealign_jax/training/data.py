"""Batches of tokenized pairs: bucket, shuffle deterministically, pad.

Batch (host NumPy dict; every array fixed-shape per bucket length L). Rows are interleaved: row 2i is
pair i's prompt + chosen response, row 2i+1 the same prompt + rejected response, right-padded
(for SFT the batch has B rows of prompt + response):
  tokens      int32[2B, L]    token ids (pad = 0)
  positions   int32[2B, L]    0, 1, 2, ... (per row)
  valid       bool[2B, L]     real tokens
  loss_mask   float32[2B, L]  1 on response tokens (the tokens the losses score)
  bci         float32[2B, L]  per-token BCI (nats) on response tokens, 0 elsewhere (0 without a store)
  ref_logps   float32[2B, L]  precomputed reference per-token log-probs (only with reference=precomputed)
  index       int64[B]        dataset example of each pair (host-side bookkeeping; not sent to devices)

With ``data.pair_layout: shared_prompt`` a pair is ONE row ``[prompt | chosen | rejected | padding]``, so
the prompt is computed once: every array above is [B, L'] with L' the shortest of ``layout_buckets`` that
holds the batch's longest prompt + chosen + rejected, ``loss_mask`` / ``bci`` / ``ref_logps`` on both
responses, and
  branch      int32[B, L']    0 prompt, 1 chosen, 2 rejected, -1 padding
  positions                   0..p-1 on the prompt; p, p+1, ... on chosen AND on rejected (both
                              responses continue from the prompt's end, as in their separate rows)
Rejected tokens see the prompt and not the chosen response (``model.attention.self_attention_fn``);
``separate`` (the reference layout) is the 2B-row one above.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from tracealign_jax.config import ConfigError, DataConfig
from tracealign_jax.pairs import TokenizedPairs


LAYOUTS = ("shared_prompt", "separate")


def row_length(bucket: int, layout: str, max_response_len: int) -> int:
    """The longest row pairs of bucket ``bucket`` (prompt + longer response <= bucket) can need: the
    bucket itself (separate), or the bucket plus room for the other response, at most
    ``max_response_len`` and at most the bucket (shared_prompt)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"data.pair_layout must be one of {' | '.join(LAYOUTS)}, got {layout!r}")
    return bucket if layout == "separate" else bucket + min(bucket, max_response_len)


def layout_buckets(buckets: Sequence[int], layout: str, max_response_len: int) -> tuple[int, ...]:
    """Row lengths a batch pads to: ``data.buckets`` (separate), or for shared_prompt those and each
    ``row_length`` of them, so a pair's row is the shortest that holds prompt + chosen + rejected."""
    return tuple(sorted(set(buckets) | {row_length(b, layout, max_response_len) for b in buckets}))


def bucket_of(total_len: int, buckets: Sequence[int]) -> int:
    """The smallest bucket length >= ``total_len``."""
    for b in sorted(buckets):
        if total_len <= b:
            return b
    raise ConfigError(f"data.buckets {list(buckets)}: an example of {total_len} tokens fits none "
                      "(need max bucket >= max_prompt_len + max_response_len)")  # fmt: skip


def assign_buckets(pairs: TokenizedPairs, buckets: Sequence[int], sft: bool = False) -> np.ndarray:
    """int64[N]: the bucket of each example, the bucket of prompt + longer response (prompt + response
    for SFT). Both pair layouts group pairs into batches by it, so the layout never changes which pairs
    train together (only ``row_length_of`` differs)."""
    resp = pairs.lengths("chosen") if sft else np.maximum(pairs.lengths("chosen"), pairs.lengths("rejected"))
    return np.asarray([bucket_of(int(n), buckets) for n in pairs.lengths("prompt") + resp], np.int64)


def row_length_of(pairs: TokenizedPairs, idx_B: np.ndarray, bucket: int, layout: str, buckets: Sequence[int],
                  max_response_len: int) -> int:  # fmt: skip
    """The row length a batch of bucket ``bucket`` pads to: the bucket (separate, SFT), or the shortest of
    ``layout_buckets`` holding the batch's longest prompt + chosen + rejected (shared_prompt)."""
    if layout != "shared_prompt":
        return bucket
    total = pairs.lengths("prompt")[idx_B] + pairs.lengths("chosen")[idx_B] + pairs.lengths("rejected")[idx_B]
    return bucket_of(int(total.max()), layout_buckets(buckets, layout, max_response_len))


def check_response_lengths(pairs: TokenizedPairs, max_response_len: int, sft: bool = False) -> None:
    """Refuses responses longer than ``data.max_response_len``: the train step scores at most that many
    tokens per response (``training.step.response_slots``). ``pairs.load_pairs`` truncates to it, so
    this names pairs built some other way."""
    for field in ("chosen",) if sft else ("chosen", "rejected"):
        lengths = pairs.lengths(field)
        if len(lengths) and int(lengths.max()) > max_response_len:
            i = int(np.argmax(lengths))
            raise ConfigError(f"data: pair {i}'s {field} response has {int(lengths[i])} tokens, more than "
                              f"data.max_response_len={max_response_len} (the log-probs score at most that many)")  # fmt: skip


def epoch_batches(bucket_N: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: example indices, each batch from one bucket, deterministic in (seed, epoch).

    Shuffle all examples, take each bucket's examples in shuffled order, cut into full batches (the
    remainder of a bucket waits for another epoch's shuffle), order batches by their first example's
    shuffled rank so buckets interleave.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(len(bucket_N))
    rank = np.empty_like(perm)
    rank[perm] = np.arange(len(perm))
    batches = []
    for b in np.unique(bucket_N):
        members = perm[bucket_N[perm] == b]
        for s in range(0, len(members) - batch_size + 1, batch_size):
            batches.append(members[s : s + batch_size])
    batches.sort(key=lambda idx: rank[idx[0]])
    return batches


def build_batch(pairs: TokenizedPairs, idx_B: np.ndarray, length: int, *, sft: bool = False,
                bci: Any = None, ref_logps: Any = None, layout: str = "separate") -> dict[str, np.ndarray]:  # fmt: skip
    """The batch dict (module docstring) for examples ``idx_B`` padded to ``length`` (the row length).

    bci / ref_logps: readers with ``read(indices) -> (chosen list[float32[T_i]], rejected list)``
    aligned to the (untruncated) response tokens; values past the truncated response are dropped.
    """
    if layout == "shared_prompt" and not sft:
        return _shared_prompt_batch(pairs, idx_B, length, bci, ref_logps)
    responses = ("chosen",) if sft else ("chosen", "rejected")
    rows = len(idx_B) * len(responses)
    out = {"tokens": np.zeros((rows, length), np.int32), "valid": np.zeros((rows, length), bool),
           "loss_mask": np.zeros((rows, length), np.float32), "bci": np.zeros((rows, length), np.float32)}  # fmt: skip
    extra = {"bci": bci.read(idx_B) if bci is not None else None, "ref_logps": ref_logps.read(idx_B) if ref_logps is not None else None}
    if extra["ref_logps"] is not None:
        out["ref_logps"] = np.zeros((rows, length), np.float32)
    for i, ex in enumerate(idx_B):
        prompt = pairs.get("prompt", int(ex))
        for j, f in enumerate(responses):
            r = i * len(responses) + j
            resp = pairs.get(f, int(ex))
            p, n = len(prompt), len(resp)
            out["tokens"][r, :p] = prompt
            out["tokens"][r, p : p + n] = resp
            out["valid"][r, : p + n] = True
            out["loss_mask"][r, p : p + n] = 1.0
            for key, got in extra.items():
                if got is not None:
                    vals = np.asarray(got[j][i], np.float32)[:n]
                    out[key][r, p : p + len(vals)] = vals
    out["positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    out["index"] = np.asarray(idx_B, np.int64)
    return out


def _shared_prompt_batch(pairs: TokenizedPairs, idx_B: np.ndarray, length: int, bci: Any,
                         ref_logps: Any) -> dict[str, np.ndarray]:  # fmt: skip
    """``build_batch`` for the shared-prompt layout: one row per pair (module docstring)."""
    rows = len(idx_B)
    out = {"tokens": np.zeros((rows, length), np.int32), "valid": np.zeros((rows, length), bool),
           "loss_mask": np.zeros((rows, length), np.float32), "bci": np.zeros((rows, length), np.float32),
           "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
           "branch": np.full((rows, length), -1, np.int32)}  # fmt: skip
    extra = {"bci": bci.read(idx_B) if bci is not None else None, "ref_logps": ref_logps.read(idx_B) if ref_logps is not None else None}
    if extra["ref_logps"] is not None:
        out["ref_logps"] = np.zeros((rows, length), np.float32)
    for i, ex in enumerate(idx_B):
        prompt, responses = pairs.get("prompt", int(ex)), [pairs.get(f, int(ex)) for f in ("chosen", "rejected")]
        p = len(prompt)
        if p + sum(map(len, responses)) > length:
            raise ValueError(f"pair {int(ex)}: prompt + chosen + rejected exceed the row length {length}")
        out["tokens"][i, :p], out["branch"][i, :p] = prompt, 0
        start = p
        for j, resp in enumerate(responses):
            n = len(resp)
            out["tokens"][i, start : start + n] = resp
            out["positions"][i, start : start + n] = np.arange(p, p + n, dtype=np.int32)
            out["branch"][i, start : start + n] = j + 1
            out["loss_mask"][i, start : start + n] = 1.0
            for key, got in extra.items():
                if got is not None:
                    vals = np.asarray(got[j][i], np.float32)[:n]
                    out[key][i, start : start + len(vals)] = vals
            start += n
        out["valid"][i, :start] = True
    out["index"] = np.asarray(idx_B, np.int64)
    return out


def split_responses(row_BxL: np.ndarray, branch_BxL: np.ndarray, loss_mask_BxL: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per pair (chosen values, rejected values) of a shared-prompt per-token array, in token order."""
    return [tuple(row_BxL[i][(branch_BxL[i] == k) & (loss_mask_BxL[i] > 0)] for k in (1, 2)) for i in range(len(row_BxL))]


class BatchStream:
    """Endless deterministic batches; ``position()`` / ``restore(position)`` make it resumable.

    Every process builds the same global batches (cheap: token arrays) and the train step takes
    each process's shards from them, so multi-host runs agree on data order by construction.
    ``layout``: separate | shared_prompt (module docstring); both layouts yield the same pairs in the
    same batches (``assign_buckets``), so a run's data order, and its result up to float rounding, do
    not depend on the layout.
    """

    def __init__(self, pairs: TokenizedPairs, cfg: DataConfig, batch_size: int, *, sft: bool = False,
                 bci: Any = None, ref_logps: Any = None, layout: str = "separate"):  # fmt: skip
        self.pairs, self.cfg, self.batch_size, self.sft = pairs, cfg, batch_size, sft
        self.layout = "separate" if sft else layout
        row_length(1, self.layout, 1)  # names a bad layout now, not at the first batch
        check_response_lengths(pairs, cfg.max_response_len, sft)
        self.bci, self.ref_logps = bci, ref_logps
        self.bucket_N = assign_buckets(pairs, cfg.buckets, sft)
        self.epoch, self.cursor = 0, 0
        self._batches = epoch_batches(self.bucket_N, batch_size, cfg.shuffle_seed, 0)
        if not self._batches:
            raise ConfigError(f"data: no bucket holds a full batch of {batch_size} examples "
                              f"({len(pairs)} examples over buckets {list(cfg.buckets)})")  # fmt: skip

    def position(self) -> dict[str, int]:
        """JSON-able iterator position (stored in checkpoints)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "num_examples": len(self.pairs)}

    def restore(self, pos: dict[str, int]) -> None:
        if int(pos.get("num_examples", len(self.pairs))) != len(self.pairs):
            raise ConfigError("data: the checkpoint's data position is for a dataset of a different size")
        self.epoch, self.cursor = int(pos["epoch"]), int(pos["cursor"])
        self._batches = epoch_batches(self.bucket_N, self.batch_size, self.cfg.shuffle_seed, self.epoch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.cursor >= len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = epoch_batches(self.bucket_N, self.batch_size, self.cfg.shuffle_seed, self.epoch)
        idx = self._batches[self.cursor]
        self.cursor += 1
        length = row_length_of(self.pairs, idx, int(self.bucket_N[idx[0]]), self.layout, self.cfg.buckets,
                               self.cfg.max_response_len)  # fmt: skip
        return build_batch(self.pairs, idx, length, sft=self.sft, bci=self.bci, ref_logps=self.ref_logps,
                           layout=self.layout)  # fmt: skip
