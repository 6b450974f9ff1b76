"""File-to-file TRACE stages behind ``tracealign realign triage|impact`` (JSONL in, JSONL + report out).

Triage input: records with ``prompt``, ``chosen``, ``rejected`` strings. Output: the same records
plus ``category`` (retain | invert | suppress), each response's compliance, rule and evidence,
and the judge's name. Impact input: triage output (token-id records ``prompt_ids`` / ``chosen_ids``
/ ``rejected_ids`` work too, as in training). Output: the records plus ``impact_score``
(<g_J, g_i>, 0 for retained pairs), ``impact_raw`` (max(0, s)/gamma), ``weight`` (L1-normalised over
conflicts, the paper's w_i) and ``weight_mean1`` (w_i x N_conflicts, what the objective takes).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracealign_jax.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from tracealign_jax.realign import judge as J
from tracealign_jax.realign.triage import CODES, summarize, triage_pairs
from tracealign_jax.records import RecordError, iter_records, require


def read_pairs(path: str | Path) -> tuple[list[int], list[dict[str, Any]]]:
    """(record numbers, records) of text pairs in any preference source and format ``preference_sources``
    reads (PKU-SafeRLHF records carry ``chosen_safe`` / ``rejected_safe``); errors name file:line:field."""
    from tracealign_jax.config import DataConfig
    from tracealign_jax.preference_sources import text_pairs

    return text_pairs(DataConfig(train_path=str(path)))


def run_triage(pairs_path: str | Path, judges: Sequence[Any], out_path: str | Path, report_path: str | Path | None = None,
               examples: int = 3) -> dict[str, Any]:  # fmt: skip
    """Triages every pair with ``judges[0]``; with more judges, also labels with each and reports
    their agreement. Writes the JSONL (and a Markdown report); returns the summary dict."""
    if not judges:
        raise ValueError("triage needs at least one judge")
    _, recs = read_pairs(pairs_path)
    prompts, chosen, rejected = ([r[f] for r in recs] for f in ("prompt", "chosen", "rejected"))
    triaged = triage_pairs(prompts, chosen, rejected, judges[0])
    out = [dict(rec, **{k: v for k, v in t.to_json().items() if k != "index"}, judge=judges[0].name)
           for rec, t in zip(recs, triaged)]  # fmt: skip
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    summary = summarize(triaged, examples)
    if len(judges) > 1:
        labels = {j.name: j.label_batch(prompts * 2, chosen + rejected) for j in judges}
        summary["agreement"] = J.agreement(labels)
    if report_path is not None:
        atomic_write_text(report_path, render_triage_report(summary, recs, triaged))
    return summary


def render_triage_report(summary: dict[str, Any], recs: Sequence[dict], triaged: Sequence[Any]) -> str:
    c = summary["counts"]
    lines = ["# TRACE triage", "", f"- pairs: {summary['total']}",
             f"- retain: {c['retain']}, invert: {c['invert']}, suppress: {c['suppress']}", ""]  # fmt: skip
    for cat in ("invert", "suppress"):
        if summary["by_rule"].get(cat):
            lines += [f"## {cat}: rule that flagged y_w", ""]
            lines += [f"- {rule}: {n}" for rule, n in sorted(summary["by_rule"][cat].items())] + [""]
    for cat, idx in summary["examples"].items():
        lines += [f"## examples: {cat}", ""]
        for i in idx:
            t = triaged[i]
            lines.append(f"- [{i}] prompt: {recs[i]['prompt'][:120]!r}; y_w {'ok' if t.chosen_compliant else 'VIOLATES'}"
                         f" {t.chosen_evidence}; y_l {'ok' if t.rejected_compliant else 'VIOLATES'} {t.rejected_evidence}")  # fmt: skip
        lines.append("")
    if "agreement" in summary:
        lines += ["## judge agreement (all responses)", "", J.render_agreement(summary["agreement"])]
    return "\n".join(lines) + "\n"


def _categories(path: Path, lines: np.ndarray) -> np.ndarray:
    """int32 category per tokenized pair, matched to its source record by line number."""
    by_line = {}
    for line, rec in iter_records(path):
        name = require(rec, "category", str, path, line)
        if name not in CODES:
            raise RecordError(path, line, "category", f"{name!r} is not one of {sorted(CODES)}")
        by_line[line] = CODES[name]
    return np.asarray([by_line[int(x)] for x in lines], np.int32)


def run_impact(cfg: Any, pairs_path: str | Path, out_path: str | Path, plot_path: str | Path | None = None,
               model: Any = None, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Impact scores and weights of every pair of a triaged file at the reference model ``cfg.model``
    (or ``model``), on the ``cfg.mesh`` device mesh (parameters sharded as in training; multi-process
    when the mesh config says so); fixed batches of ``cfg.realign.impact_batch_size`` pairs at one
    padded length, in the ``data.pair_layout`` rows (shared_prompt: the prompt computed once), logits
    on response tokens only. Pairs are batched retained, then inverted, then suppressed, so the JVP
    pass runs only on batches holding a conflict and the gold pass only on batches holding a gold pair."""
    import dataclasses

    import jax
    from flax import nnx

    from tracealign_jax import sharding
    from tracealign_jax.config import ConfigError
    from tracealign_jax.pairs import load_pairs
    from tracealign_jax.realign import impact
    from tracealign_jax.training.data import assign_buckets, build_batch, row_length_of

    pairs_path = Path(pairs_path)
    rc = cfg.realign
    sharding.initialize_distributed(cfg.mesh)
    mesh, rules = sharding.build_mesh(cfg.mesh), sharding.resolve_rules(cfg.mesh.rules)
    bs, layout = rc.impact_batch_size, cfg.data.pair_layout
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if bs % shards:
        raise ConfigError(f"realign.impact_batch_size={bs}: must be a multiple of mesh data x fsdp = {shards} "
                          "(the pairs of a batch are split over them)")  # fmt: skip
    pairs = load_pairs(dataclasses.replace(cfg.data, train_path=str(pairs_path), cache_dir=""))
    cats = _categories(pairs_path, pairs.arrays["line"])
    if model is None:
        model = _reference_model(cfg, mesh, rules)
    graphdef, params = nnx.split(model)
    n = len(pairs)
    length = row_length_of(pairs, np.arange(n), int(assign_buckets(pairs, cfg.data.buckets).max()), layout,
                           cfg.data.buckets, cfg.data.max_response_len)  # fmt: skip
    chosen, rejected = pairs.lengths("chosen"), pairs.lengths("rejected")
    response_len = int((chosen + rejected if layout == "shared_prompt" else np.maximum(chosen, rejected)).max())
    rank = {CODES["retain"]: 0, CODES["invert"]: 1, CODES["suppress"]: 2}
    order = np.argsort([rank[int(c)] for c in cats], kind="stable")
    batches = []
    for s in range(0, n, bs):
        idx = order[s : s + bs]
        padded = np.concatenate([idx, np.repeat(idx[-1:], bs - len(idx))])
        host = build_batch(pairs, padded, length, layout=layout)
        b = {k: host[k] for k in ("tokens", "positions", "valid", "loss_mask", "branch") if k in host}
        b["category"] = np.concatenate([cats[idx], np.full(bs - len(idx), impact.PAD)]).astype(np.int32)
        batches.append(b)
    scores = np.zeros(n, np.float32)
    scores[order] = impact.impact_scores(graphdef, params, batches, beta=rc.beta, invert_loss=rc.invert_loss,
                                         response_len=response_len, attention=cfg.model.attention, mesh=mesh,
                                         rules=rules, progress=progress)  # fmt: skip
    w = impact.impact_weights(scores, cats, gamma=rc.gamma)
    conf = cats != CODES["retain"]
    summary = {"pairs": n, "conflicts": int(conf.sum()), "positive": int((scores[conf] > 0).sum()),
               "score_min": float(scores[conf].min()) if conf.any() else 0.0,
               "score_max": float(scores[conf].max()) if conf.any() else 0.0}  # fmt: skip
    if jax.process_index() != 0:  # every process computed the same scores; one writes them
        return summary
    by_line = {int(line): i for i, line in enumerate(pairs.arrays["line"])}
    out = []
    for line, rec in iter_records(pairs_path):
        if line not in by_line:
            continue
        i = by_line[line]
        out.append(dict(rec, impact_score=float(scores[i]), impact_raw=float(w["raw"][i]), weight=float(w["weight"][i]),
                        weight_mean1=float(w["weight_mean1"][i])))  # fmt: skip
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    if plot_path is not None:
        _histogram(scores, cats, Path(plot_path))
    atomic_write_json(Path(out_path).with_suffix(".summary.json"), summary)
    return summary


def _reference_model(cfg: Any, mesh: Any, rules: Any) -> Any:
    """The reference: ``model.hf_dir`` loaded sharded on ``mesh``, or the random init of ``train.seed``."""
    from tracealign_jax.model import build_model, model_options

    if cfg.model.hf_dir:
        from tracealign_jax.hf_io import load_hf

        return load_hf(cfg.model.hf_dir, progress=False, mesh=mesh, rules=rules, **model_options(cfg.model))[0]
    return build_model(cfg.model, seed=cfg.train.seed)


def _histogram(scores: np.ndarray, cats: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("invert", "suppress"):
        sel = scores[cats == CODES[name]]
        if sel.size:
            ax.hist(sel, bins=30, alpha=0.6, label=f"{name} ({sel.size})")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("<g_J, g_i> (impact score; weights use max(0, .))")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
