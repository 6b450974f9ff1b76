"""Reference log-probs precomputed in one jitted pass, stored with tensorstore, reused across runs.

TRL's ``precompute_ref_log_probs`` keeps them in memory for one run; its users ask to save and reload
them (trl#3985). Here the store lives at ``<data.ref_logps_path>/<key>`` where ``key`` hashes the
reference parameters' identity (checkpoint path or HF dir, or the init seed + architecture) and the
tokenized dataset's fingerprint, so a different reference or dataset never reads stale values.
Layout: ``tracealign_jax.response_store`` (chosen/rejected float32 [N, T_max] + lengths), holding
log p_ref(token) in nats for each response token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracealign_jax import sharding
from tracealign_jax.config import Config, to_dict
from tracealign_jax.model import param_shardings
from tracealign_jax.pairs import TokenizedPairs, check_same_dataset
from tracealign_jax.response_store import ResponseArrayReader, write_response_arrays
from tracealign_jax.training.data import assign_buckets, build_batch, row_length_of, split_responses


def reference_key(cfg: Config, pairs: TokenizedPairs) -> str:
    """Identity of (reference parameters, dataset, tokenization): 16 hex chars."""
    ident = {"model": to_dict(cfg.model), "seed": cfg.train.seed, "dataset": pairs.fingerprint}
    if cfg.model.hf_dir:
        cfg_json = Path(cfg.model.hf_dir) / "config.json"
        weights = sorted(Path(cfg.model.hf_dir).glob("*.safetensors"))
        ident["hf"] = [p.name + ":" + str(p.stat().st_size) + ":" + str(int(p.stat().st_mtime)) for p in [cfg_json, *weights]]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def store_path(cfg: Config, pairs: TokenizedPairs) -> str:
    return str(Path(cfg.data.ref_logps_path) / reference_key(cfg, pairs))


def open_reference(cfg: Config, pairs: TokenizedPairs) -> ResponseArrayReader | None:
    """The stored reference log-probs for this (reference, dataset), or None if not computed yet."""
    path = store_path(cfg, pairs)
    if not (Path(path) / "meta.json").is_file():
        return None
    reader = ResponseArrayReader(path)
    check_same_dataset(reader.meta, pairs, f"data.ref_logps_path {path}")
    if reader.meta.get("kind") != "reference_logps" or len(reader) != len(pairs):
        raise ValueError(f"{path}: not a reference log-prob store for this dataset")
    return reader


def precompute_reference(cfg: Config, graphdef: nnx.GraphDef, ref_params: Any, pairs: TokenizedPairs, mesh: Mesh,
                         rules: sharding.Rules, batch_size: int = 8) -> ResponseArrayReader:  # fmt: skip
    """Computes every example's per-token reference log-probs (one jit per bucket) and stores them.

    The forward is jitted under ``mesh`` like the train step: parameters in their declared shardings,
    batch rows over the batch axes, the [rows, L] log-probs replicated so every process can read them.
    """
    from tracealign_jax.training.loop import to_device_batch
    from tracealign_jax.training.data import check_response_lengths
    from tracealign_jax.training.step import BATCH_AXES, _forward_logps, pair_layout, response_slots

    layout = pair_layout(cfg)
    rows = sharding.named_sharding(mesh, rules, BATCH_AXES)
    batch_sh = {k: rows for k in ("tokens", "positions", "valid", "loss_mask") + (("branch",) if layout == "shared_prompt" else ())}
    check_response_lengths(pairs, cfg.data.max_response_len)

    def forward(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        with sharding.use_mesh(mesh, rules):
            return _forward_logps(graphdef, params, batch, cfg.train.logprob_chunk, None, cfg.model.attention, None,
                                  response_slots(cfg))[0]  # fmt: skip

    fwd = jax.jit(forward, in_shardings=(param_shardings(ref_params, mesh, rules), batch_sh),
                  out_shardings=NamedSharding(mesh, PartitionSpec()))  # fmt: skip
    bucket_N = assign_buckets(pairs, cfg.data.buckets)
    out: list[list[np.ndarray]] = [[np.zeros(0, np.float32)] * 2 for _ in range(len(pairs))]
    order = np.argsort(bucket_N, kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        length = row_length_of(pairs, idx, int(bucket_N[idx].max()), layout, cfg.data.buckets, cfg.data.max_response_len)
        padded = np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))])
        batch = build_batch(pairs, padded, length, layout=layout)
        dev = to_device_batch({k: batch[k] for k in batch_sh}, batch_sh)
        logps = np.asarray(jax.device_get(fwd(ref_params, dev))).astype(np.float32)
        if layout == "shared_prompt":
            per_pair = split_responses(logps, batch["branch"], batch["loss_mask"])
        else:
            per_pair = [tuple(logps[2 * i + j][batch["loss_mask"][2 * i + j] > 0] for j in range(2)) for i in range(len(padded))]
        for i, ex in enumerate(idx):
            out[int(ex)] = list(per_pair[i])
    path = store_path(cfg, pairs)
    if jax.process_index() == 0:
        meta = {"kind": "reference_logps", "key": reference_key(cfg, pairs), "dataset": pairs.fingerprint,
                "dataset_identity": pairs.identity}
        write_response_arrays(path, [tuple(x) for x in out], meta=meta, overwrite=True)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("tracealign_reference_written")
    return ResponseArrayReader(path)
