"""Subprocess entry of the multi-process precompute / export test (one process of a gloo run, or alone).

    python tests/_multihost_worker.py INDEX_DIR OUT_DIR [COORDINATOR NUM_PROCESSES PROCESS_ID]

Runs the per-token BCI precompute, the veto-table build, ``save_hf`` of a model sharded over every
process's devices, the reference log-prob precompute of ``OUT_DIR/../prefs.jsonl`` (token ids)
with that model and TRACE impact scores of those pairs (``OUT_DIR/impact<process>.npy``). Writes ``OUT_DIR/p<process>.npz`` (what this process got back: the full results),
``OUT_DIR/p<process>.json`` (how many items this process scored itself) and, from process 0,
``OUT_DIR/hf`` (the exported checkpoint) and ``OUT_DIR/ref`` (the reference store).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from provenance_corpus import make_corpus  # noqa: E402
from tracealign_jax.config import ProvenanceConfig  # noqa: E402

CFG = ProvenanceConfig(min_span=3, max_span=5, max_entries=4, sample_size=256)
TAU = 10.0
TINY = ["model.arch.vocab_size=64", "model.arch.hidden_size=32", "model.arch.intermediate_size=64",
        "model.arch.num_hidden_layers=2", "mesh.data=1", "mesh.fsdp=-1"]  # fmt: skip


class _Pairs:
    """Nine preference pairs cut from the toy corpus (unsafe documents included), as TokenizedPairs serves them."""

    def __init__(self) -> None:
        docs, _ = make_corpus(0)
        picks = docs[55:64]  # benign and unsafe documents
        self.rows = [{"chosen": np.asarray(d[:20 + i]), "rejected": np.asarray(d[10:45 - i])} for i, d in enumerate(picks)]

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, response: str, i: int) -> np.ndarray:
        return self.rows[i][response]


def main() -> None:
    index_dir, out = sys.argv[1], Path(sys.argv[2])
    from tracealign_jax import sharding
    from tracealign_jax.config import MeshConfig, load_config

    if len(sys.argv) > 3:
        coordinator, n, pid = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        sharding.initialize_distributed(MeshConfig(coordinator=coordinator, num_processes=n, process_id=pid))
    import jax

    from tracealign_jax.hf_io import save_hf
    from tracealign_jax.index import TraceIndex
    from tracealign_jax.model import model_arch
    from tracealign_jax.provenance.bci import BCIScorer
    from tracealign_jax.provenance.token_bci import token_bci_for_pairs
    from tracealign_jax.provenance.veto_build import build_veto_table
    from tracealign_jax.training.state import init_train_state

    scorer = BCIScorer(TraceIndex.open(index_dir), CFG)
    scored = {"scan_batch": 0, "score_spans": 0, "score_arrays": 0}
    for name in scored:  # count what this process scores itself
        real = getattr(scorer, name)
        setattr(scorer, name, lambda items, _real=real, _name=name: (scored.__setitem__(_name, scored[_name] + len(items)),
                                                                     _real(items))[1])  # fmt: skip
    bci = token_bci_for_pairs(scorer, _Pairs(), TAU, batch=2, progress=False)
    table, meta = build_veto_table(scorer.index, scorer, CFG, TAU, progress=False)
    me = jax.process_index()
    arrays = {f"bci_{i}_{j}": a for i, pair in enumerate(bci) for j, a in enumerate(pair)}
    arrays.update({f"veto_{k}": np.asarray(getattr(table, k))
                   for k in ("ctx_hi", "ctx_lo", "ctx_chk", "offsets", "next_tokens", "penalties")})
    np.savez(out / f"p{me}.npz", **arrays)
    (out / f"p{me}.json").write_text(json.dumps({**scored, "num_spans": meta["num_spans"]}))

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml", TINY)
    mesh = sharding.build_mesh(cfg.mesh)  # every process's devices: weights sharded across processes
    _, state = init_train_state(cfg, mesh, sharding.resolve_rules(cfg.mesh.rules))
    leaves = jax.tree.leaves(state.params)
    assert any(not x.is_fully_addressable for x in leaves) == (jax.process_count() > 1)
    save_hf(state.params, model_arch(cfg.model), out / "hf", max_shard_bytes=40_000, progress=False)

    from tracealign_jax.pairs import load_pairs
    from tracealign_jax.training.reference import precompute_reference

    ref_cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml", TINY + [
        f"data.train_path={out.parent / 'prefs.jsonl'}", f"data.ref_logps_path={out / 'ref'}",
        f"data.cache_dir={out / f'cache{me}'}", "loss.reference=precomputed"])  # fmt: skip
    pairs = load_pairs(ref_cfg.data)
    graphdef, _ = init_train_state(ref_cfg, mesh, sharding.resolve_rules(ref_cfg.mesh.rules))
    reader = precompute_reference(ref_cfg, graphdef, state.params, pairs, mesh, sharding.resolve_rules(ref_cfg.mesh.rules),
                                  batch_size=8)  # fmt: skip
    chosen, rejected = reader.read(np.arange(len(pairs)))
    np.savez(out / f"ref{me}.npz", **{f"ref_{i}_{j}": a for i, pair in enumerate(zip(chosen, rejected)) for j, a in enumerate(pair)})

    # TRACE impact scores of the 12 pairs (retain / invert / suppress in turn) at those sharded weights
    from tracealign_jax.realign import impact
    from tracealign_jax.training.data import build_batch

    cats = np.array([0, 1, 2] * 4, np.int32)
    batches = []
    for s in (0, 8):  # two batches of 8 pairs (the last padded), split over the 8 devices of the mesh
        idx = np.arange(s, min(s + 8, len(cats)))
        host = build_batch(pairs, np.concatenate([idx, np.repeat(idx[-1:], 8 - len(idx))]), 32, layout="separate")
        batches.append({**{k: host[k] for k in ("tokens", "positions", "valid", "loss_mask")},
                        "category": np.concatenate([cats[idx], np.full(8 - len(idx), impact.PAD, np.int32)])})
    scores = impact.impact_scores(graphdef, state.params, batches, beta=0.3, mesh=mesh, rules=sharding.resolve_rules(cfg.mesh.rules))
    np.save(out / f"impact{me}.npy", scores)


if __name__ == "__main__":
    main()
