"""The ADB report: ``report.json`` (everything), ``report.md`` (tables for people) and PNG plots.

The report dict (built by ``evaluation.adb``) has:
  defenses: {name: metrics.summarize(...) + perplexity, perplexity_delta, benign_accuracy,
             relative_drift_reduction}, in the order the defenses ran ("none" first);
  bound:    {"rows": [{"group", "bound", "measured", "n", "auroc_bound", "estimate", "estimate_error",
            "auroc_estimate"}], "prompts": [...]}: the drift bound and the calibrated estimate next to
            the measured drift of the undefended model (per attack and overall);
  bci:      {"unsafe": [max BCI per unsafe completion], "safe": [...]} (nats), undefended model;
  meta:     free-form run description (models, data, timings).
Plots: drift_by_defense.png (grouped bars: drift per attack for each defense), bci_histogram.png
(max-BCI distribution of unsafe vs safe completions), bound_vs_measured.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tracealign_jax.atomic_io import atomic_write_json, atomic_write_text

TABLE_COLUMNS = (
    ("drift_rate", "drift", "pct"),
    ("drift_ci95", "drift 95% CI (Wilson)", "interval"),
    ("relative_drift_reduction", "reduction vs none", "pct"),
    ("attack_success_rate.overall", "attack success", "pct"),
    ("refusal_quality", "refusal quality (1-5)", "num"),
    ("over_refusal", "over-refusal", "pct"),
    ("benign_accuracy", "benign accuracy", "pct"),
    ("perplexity", "perplexity", "num"),
    ("perplexity_delta", "perplexity delta", "signed"),
)


# The TraceAlign paper's ablation on OLMo-2 (drift rate per defense), for comparison in reports.
PAPER_DRIFT = {"none": 0.418, "traceshield": 0.146, "cbd": 0.161, "prov_decode": 0.124, "all": 0.062}


DEFENSE_ORDER = ("none", "traceshield", "prov_decode", "cbd", "all")


def ordered(defenses: dict[str, Any]) -> dict[str, Any]:
    """The defenses in the paper's ablation order (JSON round trips sort keys), unknown ones last."""
    rank = {name: i for i, name in enumerate(DEFENSE_ORDER)}
    return {k: defenses[k] for k in sorted(defenses, key=lambda k: (rank.get(k, len(rank)), k))}


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "signed":
        return f"{value:+.3f}"
    if kind == "interval":
        return f"{100 * value[0]:.1f}-{100 * value[1]:.1f}%"
    return f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_table(report: dict[str, Any]) -> str:
    """The headline Markdown table: one row per defense."""
    rows = [[name] + [_fmt(_get(m, key), kind) for key, _, kind in TABLE_COLUMNS]
            for name, m in ordered(report["defenses"]).items()]
    return _table(["defense"] + [title for _, title, _ in TABLE_COLUMNS], rows)


def _breakdown(report: dict[str, Any], field: str) -> str:
    groups = sorted({g for m in report["defenses"].values() for g in (m.get(field) or {})})
    rows = [[name] + [_fmt((m.get(field) or {}).get(g), "pct") for g in groups]
            for name, m in ordered(report["defenses"]).items()]
    return _table(["defense"] + groups, rows)


def _coverage_table(report: dict[str, Any]) -> str:
    groups = sorted({g for m in report["defenses"].values() for g in (m.get("drift_by_coverage") or {})})
    rows = []
    for name, m in ordered(report["defenses"]).items():
        rate, ci = m.get("drift_by_coverage") or {}, m.get("drift_by_coverage_ci95") or {}
        rows.append([name] + [f"{_fmt(rate.get(g), 'pct')} [{_fmt(ci.get(g), 'interval')}]" if g in ci
                              else _fmt(rate.get(g), "pct") for g in groups])
    return _table(["defense"] + groups, rows)


def to_markdown(report: dict[str, Any]) -> str:
    paper = ", ".join(f"{k} {100 * v:.1f}%" for k, v in PAPER_DRIFT.items())
    parts = ["# Alignment Drift Benchmark report", "", main_table(report), "",
             f"For comparison, the TraceAlign paper's OLMo-2 ablation (drift): {paper}; perplexity +0.21 for all three.", "",
             "## Drift by attack", "", _breakdown(report, "drift_by_attack"), "",
             "## Drift by category", "", _breakdown(report, "drift_by_category"), ""]
    if any(m.get("drift_by_coverage") for m in report["defenses"].values()):
        parts += ["## Drift by coverage (what the defenses can know of the source)", "",
                  "single: one surface form, indexed; variant: also a capitalized copy the index does not "
                  "hold (a token-boundary variant). Wilson 95% intervals in brackets.", "",
                  _coverage_table(report), ""]
    fpr = {n: m.get("shield_false_positive_rate") for n, m in ordered(report["defenses"]).items()
           if m.get("shield_false_positive_rate") is not None}
    if fpr:
        parts += ["## TraceShield false-positive rate (safe completions flagged)", "",
                  _table(["defense", "FPR"], [[n, _fmt(v, "pct")] for n, v in fpr.items()]), ""]
        flags = report.get("shield_flags") or {}
        if flags.get("flagged", {}).get("n"):
            f, p = flags["flagged"], flags["passed"]
            parts += [f"Of the {f['n']} raw completions the judge calls safe that TraceShield flags, "
                      f"{_fmt(f['share'], 'pct')} hold a {flags['fragment_words']}-word run of a forbidden step "
                      f"(too short for the judge's window), against {_fmt(p['share'], 'pct')} of the {p['n']} "
                      "it passes: the flags fall on partial regurgitations of forbidden procedures.", ""]
    bound_rows = (report.get("bound") or {}).get("rows") or []
    if bound_rows:
        parts += ["## Drift bound vs measured drift (undefended model)", "",
                  "The bound (sound under A1-A4, provenance/bound.py) describes a model that continues like its "
                  "corpus; 'no back-off' drops A4, 'corpus rate' is the A1 point estimate without the sampling "
                  "margin: the gap to 'measured' is what A1 costs for an aligned policy. The estimate weighs the "
                  "drifting corpus continuations by the policy's probability of them (cross-fitted logistic, "
                  "evaluation/drift_estimate.py). AUROC: how well the per-prompt value ranks the prompts that "
                  "drifted above those that did not.", "",
                  _table(["group", "bound", "holds", "bound / measured", "AUROC (bound)", "no back-off",
                          "corpus rate", "measured", "estimate", "estimate error", "AUROC (estimate)", "prompts"],
                         [[r["group"], _fmt(r["bound"], "pct"),
                           "yes" if r["bound"] is not None and r["measured"] is not None
                           and r["bound"] >= r["measured"] else "no",
                           f"{r['bound'] / r['measured']:.2f}x" if r.get("measured") else "n/a",
                           _fmt(r.get("auroc_bound"), "num"), _fmt(r.get("bound_no_backoff"), "pct"),
                           _fmt(r.get("corpus_rate"), "pct"), _fmt(r["measured"], "pct"),
                           _fmt(r.get("estimate"), "pct"), _fmt(r.get("estimate_error"), "signed"),
                           _fmt(r.get("auroc_estimate"), "num"), str(r["n"])] for r in bound_rows]), ""]
    if report.get("realign"):  # the demo's realign stage (evaluation.realign_demo renders its table)
        parts += ["## Re-alignment after a policy shift (TRACE vs baselines)", "", report["realign"]["markdown"]]
    meta = report.get("meta") or {}
    if meta:
        parts += ["## Run", ""] + [f"- **{k}**: {v}" for k, v in meta.items()] + [""]
    return "\n".join(parts)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_drift(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    defenses = ordered(report["defenses"])
    names = list(defenses)
    attacks = sorted({a for m in report["defenses"].values() for a in (m.get("drift_by_attack") or {})})
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 4))
    width = 0.8 / max(1, len(attacks) + 1)
    for j, attack in enumerate(attacks + ["overall"]):
        vals = [(m.get("drift_rate") if attack == "overall" else (m.get("drift_by_attack") or {}).get(attack)) or 0.0
                for m in defenses.values()]
        ax.bar([i + (j - len(attacks) / 2) * width for i in range(len(names))], [100 * v for v in vals],
               width, label=attack)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("drift rate (%)")
    ax.set_title("Alignment drift by defense and attack")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_bci(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    bci = report.get("bci") or {}
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [v for k in ("unsafe", "safe") for v in bci.get(k, [])]
    bins = 30 if values else 1
    rng = (0.0, max(values) if values and max(values) > 0 else 1.0)
    for key, colour in (("safe", "tab:blue"), ("unsafe", "tab:red")):
        ax.hist(bci.get(key, []), bins=bins, range=rng, alpha=0.6, color=colour,
                label=f"{key} completions (n={len(bci.get(key, []))})")
    if bci.get("tau") is not None:
        ax.axvline(bci["tau"], color="k", linestyle="--", label=f"tau = {bci['tau']:.2f}")
    ax.set_xlabel("max BCI of a matched span (nats)")
    ax.set_ylabel("completions")
    ax.set_title("BCI of unsafe vs safe completions")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_bound(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in (report.get("bound") or {}).get("rows", []) if r["bound"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r["bound"] for r in rows], 0.4, label="bound")
    ax.bar([x + 0.2 for x in xs], [100 * (r["measured"] or 0.0) for r in rows], 0.4, label="measured")
    ax.set_xticks(list(xs), [r["group"] for r in rows])
    ax.set_ylabel("drift (%)")
    ax.set_title("Drift bound vs measured drift (undefended)")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Writes report.json, report.md and the three PNGs into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md",
             "drift_plot": out_dir / "drift_by_defense.png", "bci_plot": out_dir / "bci_histogram.png",
             "bound_plot": out_dir / "bound_vs_measured.png"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], to_markdown(report))
    _plot_drift(report, paths["drift_plot"])
    _plot_bci(report, paths["bci_plot"])
    _plot_bound(report, paths["bound_plot"])
    return paths
