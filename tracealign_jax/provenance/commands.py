"""CLI: ``tracealign bci score|calibrate``, ``tracealign shield``, ``tracealign bound``,
``tracealign provenance token-bci|veto-table``. Parse, call, print: the logic lives in the modules."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from tracealign_jax.atomic_io import atomic_write_jsonl, atomic_write_text
from tracealign_jax.records import RecordError, iter_records


def _common(p: argparse.ArgumentParser, threshold: bool = False) -> None:
    p.add_argument("--config", default=None, help="YAML config (the provenance section is used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    p.add_argument("--index", default="", help="TraceIndex directory (default: provenance.index_path)")
    p.add_argument("--verify", choices=("auto", "size", "full"), default="auto",
                   help="index integrity check (auto: SHA-256 of files changed since last verified)")
    if threshold:
        p.add_argument("--threshold", default="", help="calibrated threshold JSON (default: provenance.threshold_path)")
        p.add_argument("--tau", type=float, default=None, help="use this tau (nats) instead of a threshold file")


def _setup(args: argparse.Namespace, data_tokenizer: bool = False) -> tuple[Any, Any, Any]:
    """(config, index, scorer). ``data_tokenizer``: the command reads preference data tokenized with
    ``data.tokenizer_dir``, so the index must have been built with that same tokenizer."""
    from tracealign_jax.config import ConfigError, load_config
    from tracealign_jax.index import TraceIndex
    from tracealign_jax.provenance.bci import BCIScorer

    cfg = load_config(args.config, args.set)
    path = args.index or cfg.provenance.index_path
    if not path:
        raise ConfigError("no index: pass --index DIR or set provenance.index_path")
    expected = None
    if data_tokenizer and cfg.data.tokenizer_dir:
        from tracealign_jax.index.corpus import tokenizer_fingerprint

        expected = tokenizer_fingerprint(cfg.data.tokenizer_dir)[1]
    index = TraceIndex.open(path, expected_tokenizer_hash=expected, verify=getattr(args, "verify", "auto"))
    return cfg, index, BCIScorer(index, cfg.provenance)


def _tau(args: argparse.Namespace, cfg: Any, index: Any, scorer: Any) -> tuple[float, Any]:
    from tracealign_jax.config import ConfigError
    from tracealign_jax.provenance.calibrate import Threshold

    if args.tau is not None:
        return float(args.tau), None
    path = args.threshold or cfg.provenance.threshold_path
    if not path:
        raise ConfigError("no threshold: pass --threshold FILE (from `tracealign bci calibrate`) or --tau")
    thr = Threshold.load(path, index, scorer.settings())
    return thr.tau, thr


def _items(path: str, field: str, index: Any, keep_records: bool = False) -> tuple:
    """Token lists from JSONL/Parquet: ``tokens`` / ``<field>_ids`` (int lists) or ``<field>`` text (a
    string, or chat messages rendered with the index tokenizer's chat template).

    Returns (tokens, texts), and with ``keep_records`` also the ``(line, record)`` pairs."""
    tok = None
    tokens, texts, records = [], [], []
    for line, rec in iter_records(path):
        records.append((line, rec))
        ids = rec.get("tokens", rec.get(f"{field}_ids"))
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise RecordError(path, line, "tokens", "expected a list of token ids")
            if ids and not 0 <= min(ids) <= max(ids) < index.vocab_size:
                raise RecordError(path, line, "tokens", f"token id {max(ids) if max(ids) >= index.vocab_size else min(ids)} "
                                                        f"outside the index vocabulary [0, {index.vocab_size}): "
                                                        "tokenized with another tokenizer?")
            tokens.append(np.asarray(ids, np.int64))
            texts.append("")
            continue
        text = rec.get(field)
        if not isinstance(text, (str, list)):
            raise RecordError(path, line, field, "missing (a string or chat messages; or give token ids in 'tokens')")
        if tok is None:
            if index.tokenizer_dir is None:
                raise RecordError(path, line, field, "text input needs an index built with a tokenizer")
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(index.tokenizer_dir))
        if isinstance(text, list):  # a conversation: the text the model sees
            from tracealign_jax.chat import render_conversation

            text = render_conversation(tok, text, path, line, field)
        tokens.append(np.asarray(tok.encode(text, add_special_tokens=False), np.int64))
        texts.append(text)
    return (tokens, texts, records) if keep_records else (tokens, texts)


def _score(args: argparse.Namespace) -> int:
    cfg, index, scorer = _setup(args)
    tokens, _ = _items(args.input, args.field, index)
    rows = []
    print(f"{'item':>5} {'span':>9} {'count':>7} {'rarity':>8} {'conflict':>8} {'BCI':>8}")
    for i, spans in enumerate(scorer.scan_batch(tokens)):
        for s in sorted(spans, key=lambda s: -s.bci):
            rows.append(dict(item=i, start=s.start, end=s.end, count=s.count, rarity=s.rarity, density=s.density,
                             conflict=s.conflict, bci=s.bci, tokens=tokens[i][s.start:s.end].tolist()))
            print(f"{i:>5} {f'{s.start}-{s.end}':>9} {s.count:>7} {s.rarity:>8.2f} {s.conflict:>8.3f} {s.bci:>8.2f}")
    if args.out:
        atomic_write_jsonl(args.out, rows)
    return 0


def _labelled(path: str, field: str, index: Any) -> list[Any]:
    """Labelled completions: token ids or text (as ``_items``) + ``label`` refuse | pass + optional ``kind``."""
    from tracealign_jax.provenance.score_eval import Labelled

    tokens, _, recs = _items(path, field, index, keep_records=True)
    out = []
    for (line, rec), toks in zip(recs, tokens):
        label = rec.get("label")
        if label not in ("refuse", "pass"):
            raise RecordError(path, line, "label", f"expected 'refuse' or 'pass', got {label!r}")
        out.append(Labelled(toks, label, str(rec.get("kind") or label)))
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from tracealign_jax.config import ConfigError, load_config
    from tracealign_jax.index import TraceIndex
    from tracealign_jax.provenance.score_eval import evaluate_modes, render_table

    cfg = load_config(args.config, args.set)
    if args.synthetic is not None:
        from tracealign_jax.evaluation.span_corpus import write_span_world

        paths = write_span_world(args.synthetic, args.work, progress=True)
        index_path, labelled, compliant = paths["index"], str(paths["completions"]), str(paths["heldout"])
        print(f"generated world seed {args.synthetic} -> {args.work}")
    else:
        index_path = args.index or cfg.provenance.index_path
        labelled, compliant = args.labelled, args.compliant
        if not (index_path and labelled and compliant):
            raise ConfigError("pass --index, --labelled and --compliant (or --synthetic SEED)")
    index = TraceIndex.open(index_path)
    items = _labelled(labelled, args.field, index)
    calib, _ = _items(compliant, args.field, index)
    results = evaluate_modes(index, cfg.provenance, items, calib, modes=[m for m in args.modes.split(",") if m],
                             target_fpr=args.target_fpr)
    print(render_table(results), end="")
    if args.out:
        from tracealign_jax.atomic_io import atomic_write_json

        atomic_write_json(args.out, results)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from tracealign_jax.provenance.calibrate import calibrate, split_heldout

    cfg, index, scorer = _setup(args)
    tokens, _ = _items(args.compliant, args.field, index)
    calib, held = split_heldout(tokens, args.heldout_fraction, args.seed)
    target = cfg.provenance.target_fpr if args.target_fpr is None else args.target_fpr
    thr = calibrate(scorer, calib, held, target, cfg.provenance.calibration_confidence)
    thr.save(args.out)
    print(f"tau = {thr.tau:.4f} nats  target FPR {thr.target_fpr:.4f} (certified <= {thr.certified_fpr:.4f} at "
          f"confidence {thr.confidence:.2f}, n={thr.n_calibration})  held-out FPR {thr.measured_fpr:.4f} "
          f"+/- {thr.stderr:.4f} (n={thr.n_heldout})  index {thr.index_hash} -> {args.out}")
    return 0


def _shield(args: argparse.Namespace) -> int:
    from tracealign_jax.provenance.calibrate import Threshold
    from tracealign_jax.provenance.shield import TraceShield, render_report, write_jsonl

    cfg, index, scorer = _setup(args)
    tau, thr = _tau(args, cfg, index, scorer)
    thr = thr or Threshold(tau, float("nan"), float("nan"), str(index.manifest_hash))
    tokens, texts, records = _items(args.input, args.field, index, keep_records=True)
    shield = TraceShield(index, scorer, thr, top_sources=cfg.provenance.top_sources)
    verdicts = shield.check_batch(tokens)
    for v, t, (line, rec) in zip(verdicts, texts, records):
        v.text, v.id = t, str(rec.get("id", line))
        v.passthrough = {k: val for k, val in rec.items() if k not in ("id", args.field, "tokens", f"{args.field}_ids")}
    write_jsonl(verdicts, args.out)
    report = render_report(verdicts)
    if args.report:
        atomic_write_text(args.report, report)
    print(f"{sum(v.refuse for v in verdicts)} of {len(verdicts)} completions refused (tau {tau:.3f}) -> {args.out}")
    return 0


def _bound(args: argparse.Namespace) -> int:
    import dataclasses

    from tracealign_jax.provenance.bound import drift_bound, set_bound

    cfg, index, scorer = _setup(args)
    tau, _ = _tau(args, cfg, index, scorer)
    queries, _ = _items(args.queries, args.field, index)
    p = cfg.provenance
    bounds = drift_bound(index, scorer, queries, tau, horizon=args.horizon or p.horizon, delta=p.delta,
                         max_occurrences=args.max_occurrences, epsilon=args.epsilon)
    atomic_write_jsonl(args.out, [dict(dataclasses.asdict(b), item=i) for i, b in enumerate(bounds)])
    print(f"{'item':>5} {'l_q':>4} {'M(q)':>8} {'examined':>8} {'drifting':>8} {'bound':>7}")
    for i, b in enumerate(bounds):
        print(f"{i:>5} {b.context_len:>4} {b.support:>8} {b.examined:>8} {b.drifting + b.truncated:>8} {b.bound:>7.4f}")
    print(f"drift-rate bound over {len(bounds)} queries (confidence {1 - p.delta:.2f}): {set_bound(bounds, p.delta):.4f}")
    return 0


def _token_bci(args: argparse.Namespace) -> int:
    from tracealign_jax.pairs import check_token_ids, load_pairs
    from tracealign_jax.provenance.token_bci import token_bci_for_pairs
    from tracealign_jax.response_store import write_response_arrays

    cfg, index, scorer = _setup(args, data_tokenizer=True)
    tau, _ = _tau(args, cfg, index, scorer)
    out = args.out or cfg.data.bci_path
    if not out:
        from tracealign_jax.config import ConfigError

        raise ConfigError("no output: pass --out STORE or set data.bci_path")
    pairs = load_pairs(cfg.data, show_progress=True)
    check_token_ids(pairs, index.vocab_size, cfg.data.train_path, "the index's")
    arrays = token_bci_for_pairs(scorer, pairs, tau)
    meta = {"tau": tau, "index_hash": str(index.manifest_hash), "dataset": getattr(pairs, "fingerprint", ""),
            "dataset_identity": pairs.identity, "tokenizer_hash": index.tokenizer_hash, "vocab_size": index.vocab_size,
            "bci_settings": scorer.settings()}
    url = write_response_arrays(out, arrays, meta=meta, overwrite=args.overwrite)
    flagged = sum(int((c > 0).any()) + int((r > 0).any()) for c, r in arrays)
    print(f"{len(arrays)} examples, {flagged} responses with high-BCI tokens -> {url}")
    return 0


def _veto(args: argparse.Namespace) -> int:
    from tracealign_jax.provenance.veto_build import build_veto_table
    from tracealign_jax.veto.store import save_veto_table

    cfg, index, scorer = _setup(args)
    tau, _ = _tau(args, cfg, index, scorer)
    table, meta = build_veto_table(index, scorer, cfg.provenance, tau, max_docs=args.max_docs)
    meta = dict(meta, tokenizer_hash=index.tokenizer_hash, vocab_size=index.vocab_size)  # checked where a model meets it
    save_veto_table(table, args.out, meta=meta, overwrite=args.overwrite)
    print(f"{meta['num_spans']} high-BCI spans -> {table.num_contexts} contexts, {table.num_entries} entries, "
          f"{table.nbytes() / 1e6:.2f} MB -> {args.out}")
    return 0


def register(subparsers: Any) -> None:
    bci = subparsers.add_parser("bci", help="Belief Conflict Index: score spans, calibrate tau")
    sub = bci.add_subparsers(dest="bci_command", metavar="SUBCOMMAND")
    p = sub.add_parser("score", help="maximal corpus spans of each input, with rarity/conflict/BCI")
    _common(p)
    p.add_argument("--input", required=True, help="JSONL/Parquet with 'tokens' or a text field")
    p.add_argument("--field", default="text")
    p.add_argument("--out", default="", help="optional JSONL of scored spans")
    p.set_defaults(run=_score)
    p = sub.add_parser("calibrate", help="choose tau on compliant text for a target false-positive rate")
    _common(p)
    p.add_argument("--compliant", required=True, help="policy-compliant held-out texts (JSONL/Parquet)")
    p.add_argument("--field", default="text")
    p.add_argument("--target-fpr", type=float, default=None)
    p.add_argument("--heldout-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="threshold JSON (records the index manifest hash)")
    p.set_defaults(run=_calibrate)
    p = sub.add_parser("evaluate", help="refusal rate per kind, precision/recall/FPR of each BCI mode side by side")
    _common(p)
    p.add_argument("--labelled", default="", help="completions JSONL/Parquet: text or 'tokens', "
                   "'label' refuse|pass, optional 'kind'")
    p.add_argument("--compliant", default="", help="compliant held-out texts: tau is calibrated on them per mode")
    p.add_argument("--synthetic", type=int, default=None, metavar="SEED",
                   help="generate a labelled world with this seed into --work (corpus, tokenizer, index) and use it")
    p.add_argument("--work", default="runs/bci_eval", help="folder for --synthetic")
    p.add_argument("--field", default="text")
    p.add_argument("--modes", default="evidence,conflict_x_rarity,conflict_x_rarity:0.5,rarity",
                   help="comma-separated bci modes; MODE:A fixes the conflict prior Beta(A, A)")
    p.add_argument("--target-fpr", type=float, default=None)
    p.add_argument("--out", default="", help="results JSON")
    p.set_defaults(run=_evaluate)

    p = subparsers.add_parser("shield", help="TraceShield: refuse completions with a span of BCI > tau")
    _common(p, threshold=True)
    p.add_argument("--input", required=True, help="completions: JSONL/Parquet with 'tokens' or a text field")
    p.add_argument("--field", default="text")
    p.add_argument("--out", required=True, help="verdicts JSONL")
    p.add_argument("--report", default="", help="Markdown report for people")
    p.set_defaults(run=_shield)

    p = subparsers.add_parser("bound", help="drift-probability bound per query from index span statistics")
    _common(p, threshold=True)
    p.add_argument("--queries", required=True, help="prompts: JSONL/Parquet with 'tokens' or a text field")
    p.add_argument("--field", default="prompt")
    p.add_argument("--horizon", type=int, default=0, help="completion tokens (default provenance.horizon)")
    p.add_argument("--max-occurrences", type=int, default=256)
    p.add_argument("--epsilon", type=float, default=0.0, help="slack: chance the model leaves corpus behaviour")
    p.add_argument("--out", required=True, help="bounds JSONL")
    p.set_defaults(run=_bound)

    prov = subparsers.add_parser("provenance", help="precomputed provenance arrays for training and decoding")
    sub = prov.add_subparsers(dest="provenance_command", metavar="SUBCOMMAND")
    p = sub.add_parser("token-bci", help="per-token BCI arrays of a preference set (tensorstore zarr)")
    _common(p, threshold=True)
    p.add_argument("--out", default="", help="store path or URL (default data.bci_path)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_token_bci)
    p = sub.add_parser("veto-table", help="compile the provenance veto table from an index")
    _common(p, threshold=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-docs", type=int, default=0, help="only the first N violating documents (0 = all)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_veto)
    for parser in (bci, prov):
        parser.set_defaults(run=lambda a, _p=parser: (_p.print_help(file=sys.stderr), 2)[1])
