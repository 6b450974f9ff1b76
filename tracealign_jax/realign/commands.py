"""``tracealign realign triage`` and ``tracealign realign impact``: parse, call ``realign.pipeline``, print."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    realign = subparsers.add_parser("realign", help="TRACE: re-align preference data and a model to a new policy")
    sub = realign.add_subparsers(dest="realign_command", metavar="STAGE")

    triage = sub.add_parser("triage", help="label y_w / y_l with a judge of the new policy: retain / invert / suppress")
    triage.add_argument("--pairs", required=True, help="string prompt/chosen/rejected pairs in any source and layout "
                                                       "data.train_path takes (README: Preference data formats)")
    triage.add_argument("--config", default=None, help="YAML config (provenance.* for the provenance judge, realign.*)")
    triage.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    triage.add_argument("--rules", default="", help="policy YAML for the rules judge (default: realign.rules)")
    triage.add_argument("--index", default="", help="TraceIndex dir: adds the provenance judge (with --threshold)")
    triage.add_argument("--threshold", default="", help="calibrated threshold JSON of --index")
    triage.add_argument("--classifier", default="", help="local HF sequence-classification dir: adds the classifier judge")
    triage.add_argument("--classifier-threshold", type=float, default=0.5, help="P(unsafe) at or above which a response violates")
    triage.add_argument("--primary", choices=["rules", "provenance", "classifier"], default=None,
                        help="the judge that triages (default: rules if given); the others are compared with it")
    triage.add_argument("--cache", default="", help="label cache directory, one JSONL per judge (default: realign.label_cache)")
    triage.add_argument("--out", required=True, help="output JSONL (input records + category and evidence)")
    triage.add_argument("--report", default=None, help="Markdown report (counts, examples, judge agreement)")
    triage.set_defaults(run=_triage)

    impact = sub.add_parser("impact", help="impact scores <g_J, g_i> and TRACE weights of the conflicting pairs")
    impact.add_argument("--config", required=True, help="YAML config: model (the reference), data (tokenizer, lengths), realign")
    impact.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    impact.add_argument("--pairs", required=True, help="triage output JSONL (records with a category)")
    impact.add_argument("--out", required=True, help="output JSONL (records + impact_score, weight, weight_mean1)")
    impact.add_argument("--plot", default=None, help="histogram PNG of the conflicts' scores")
    impact.set_defaults(run=_impact)
    realign.set_defaults(run=lambda args: (realign.print_help(), 2)[1])


def _triage(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tracealign_jax.config import load_config
    from tracealign_jax.realign import judge as J
    from tracealign_jax.realign.pipeline import run_triage

    cfg = load_config(args.config, args.overrides)
    rules, cache = args.rules or cfg.realign.rules, args.cache or cfg.realign.label_cache
    judges = {}
    if rules:
        judges["rules"] = J.RulesJudge.from_yaml(rules)
    if args.index:
        if not args.threshold:
            raise FileNotFoundError("--index needs --threshold (the threshold calibrated on that index)")
        from tracealign_jax.index import TraceIndex
        from tracealign_jax.provenance.bci import BCIScorer
        from tracealign_jax.provenance.calibrate import Threshold
        from tracealign_jax.provenance.shield import TraceShield

        index = TraceIndex.open(args.index)
        scorer = BCIScorer(index, cfg.provenance)
        thr = Threshold.load(args.threshold, index, scorer.settings())
        judges["provenance"] = J.ProvenanceJudge(TraceShield(index, scorer, thr))
    if args.classifier:
        judges["classifier"] = J.ContentPolicyJudge.classifier(args.classifier, threshold=args.classifier_threshold)
    if not judges:
        raise FileNotFoundError("realign triage needs a judge: --rules, --index with --threshold, or --classifier")
    if cache:
        judges = {k: J.CachedJudge(j, Path(cache) / f"{k}.jsonl") for k, j in judges.items()}
    primary = args.primary or next(iter(judges))
    if primary not in judges:
        raise FileNotFoundError(f"--primary {primary}: that judge is not configured")
    ordered = [judges[primary]] + [j for k, j in judges.items() if k != primary]
    summary = run_triage(args.pairs, ordered, args.out, args.report)
    c = summary["counts"]
    print(f"triaged {summary['total']} pairs with the {primary} judge: retain {c['retain']}, invert {c['invert']}, "
          f"suppress {c['suppress']} -> {args.out}")  # fmt: skip
    for row in summary.get("agreement", []):
        print(f"agreement {row['a']} vs {row['b']}: {row['agree']:.3f} (kappa {row['kappa']:.3f}, n={row['n']})")
    return 0


def _impact(args: argparse.Namespace) -> int:
    from tracealign_jax.config import load_config
    from tracealign_jax.realign.pipeline import run_impact

    cfg = load_config(args.config, args.overrides)
    s = run_impact(cfg, args.pairs, args.out, args.plot)
    print(f"impact of {s['conflicts']} conflicting pairs (of {s['pairs']}): {s['positive']} with <g_J, g_i> > 0, "
          f"scores in [{s['score_min']:.4g}, {s['score_max']:.4g}] -> {args.out}")  # fmt: skip
    return 0
