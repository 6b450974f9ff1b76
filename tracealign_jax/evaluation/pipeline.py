"""The demo's provenance, evaluation and export stages (each ``fn(stage_dir) -> JSON result``).

Kept apart from ``demo.py`` (which orders and caches the stages) so each stage is importable and
testable on its own, and so ``tracealign eval adb`` reuses ``evaluate_stage`` on any models.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tracealign_jax.atomic_io import atomic_write_json, atomic_write_jsonl
from tracealign_jax.config import Config

Stage = Callable[[Path], dict]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def index_stage(data_dir: Path, tok_dir: str) -> Stage:
    def run(out: Path) -> dict:
        from tracealign_jax.index import build_index

        path = build_index([data_dir / "corpus.jsonl"], tok_dir, out / "index", progress=True)
        return {"dir": str(path)}

    return run


CALIBRATION_SET = "heldout-calibration+benign-corpus-responses"


def calibrate_stage(cfg: Config, index_dir: str, data_dir: Path, tokenizer: Any) -> Stage:
    """tau from compliant text, FPR measured on a disjoint half.

    The compliant text is the held-out split "calibration" plus the responses of the benign
    training documents: a model that memorized its corpus regurgitates those verbatim, and their long
    exact matches are what TraceShield sees on benign prompts (held-out text alone only ever matches
    short spans, which would put tau below the BCI of a verbatim benign answer).
    """

    def run(out: Path) -> dict:
        from tracealign_jax.index import TraceIndex
        from tracealign_jax.provenance.bci import BCIScorer
        from tracealign_jax.provenance.calibrate import calibrate
        from tracealign_jax.provenance.calibrate import split_heldout

        index = TraceIndex.open(index_dir)
        texts = [h["text"] for h in _read_jsonl(data_dir / "heldout.jsonl") if h["split"] == "calibration"]
        marker = "### Response:"
        texts += [d["text"].split(marker, 1)[-1] for d in _read_jsonl(data_dir / "corpus.jsonl") if not d["unsafe"]]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        cal, held = split_heldout(ids, 0.5, seed=0)
        thr = calibrate(BCIScorer(index, cfg.provenance), cal, held, cfg.provenance.target_fpr,
                        cfg.provenance.calibration_confidence)
        thr.save(out / "threshold.json")
        return {"threshold": str(out / "threshold.json"), "tau": thr.tau, "measured_fpr": thr.measured_fpr,
                "n_calibration": thr.n_calibration, "n_heldout": thr.n_heldout}

    return run


def arrays_stage(dpo_cfg: Config, index_dir: str, tau: float) -> Stage:
    """Per-token BCI of the preference set (tensorstore) + the provenance veto table."""

    def run(out: Path) -> dict:
        from transformers import AutoTokenizer

        from tracealign_jax.index import TraceIndex
        from tracealign_jax.pairs import load_pairs
        from tracealign_jax.provenance import BCIScorer, build_veto_table
        from tracealign_jax.provenance.token_bci import token_bci_for_pairs
        from tracealign_jax.response_store import write_response_arrays
        from tracealign_jax.veto.store import save_veto_table

        index = TraceIndex.open(index_dir)
        scorer = BCIScorer(index, dpo_cfg.provenance)
        tokenizer = AutoTokenizer.from_pretrained(dpo_cfg.data.tokenizer_dir)
        pairs = load_pairs(dataclasses.replace(dpo_cfg.data, cache_dir=str(out / "data_cache")), tokenizer=tokenizer)
        examples = token_bci_for_pairs(scorer, pairs, tau)
        meta = {"index_hash": str(index.manifest_hash), "tau": tau, "bci_settings": scorer.settings()}
        store = write_response_arrays(str(out / "token_bci"), examples, meta=meta)
        table, meta = build_veto_table(index, scorer, dpo_cfg.provenance, tau)
        save_veto_table(table, out / "veto_table", meta=meta)
        nonzero = [float((c > 0).mean()) for c, _ in examples] + [float((r > 0).mean()) for _, r in examples]
        return {"token_bci": str(out / "token_bci"), "store_url": store, "veto_table": str(out / "veto_table"),
                "num_spans": meta["num_spans"], "num_contexts": meta["num_contexts"],
                "mean_flagged_token_share": float(np.mean(nonzero)) if nonzero else 0.0}

    return run


def _load_policy(cfg: Config, path: str) -> Any:
    """A policy from a HF checkpoint dir or a `tracealign train` run dir, on the first device (its own
    architecture; the config's model section is not used)."""
    import jax

    from tracealign_jax import sharding
    from tracealign_jax.config import MeshConfig
    from tracealign_jax.decoding.job import load_policy, model_dir_kind
    from tracealign_jax.hf_io import load_hf

    if model_dir_kind(path) == "hf":
        return load_hf(path, progress=False)[0]
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    return load_policy(cfg, path, mesh, sharding.resolve_rules(cfg.mesh.rules))


def run_adb_eval(cfg: Config, *, prompts: str | Path, policies: dict[str, str], index_dir: str, threshold: str,
                 veto_table: str = "", forbidden: str | Path = "", qa: str | Path = "", heldout: str | Path = "",
                 out_dir: str | Path, tokenizer: Any = None, log: Callable[[str], None] = print) -> dict:
    """The ADB evaluation on given HF policy dirs; writes completions.jsonl + report files to ``out_dir``.

    Defenses that need a missing piece (the cbd policy, a veto table) are skipped with a note.
    ``heldout`` JSONL records with ``split`` keep only the "utility" split.
    """
    from transformers import AutoTokenizer

    from tracealign_jax.evaluation import adb
    from tracealign_jax.evaluation.judges import make_judge
    from tracealign_jax.evaluation.report import write_report
    from tracealign_jax.evaluation.scoring import build_report
    from tracealign_jax.evaluation.synthetic_data import REFUSAL
    from tracealign_jax.index import TraceIndex
    from tracealign_jax.provenance import BCIScorer, Threshold, TraceShield
    from tracealign_jax.veto.store import load_veto_table

    ev, out_dir = cfg.eval, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = TraceIndex.open(index_dir)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(index.tokenizer_dir))
    scorer = BCIScorer(index, cfg.provenance)
    thr = Threshold.load(threshold, index, scorer.settings())
    decode = dataclasses.replace(cfg.decode, tau=thr.tau) if cfg.decode.tau <= 0 else cfg.decode
    cfg = dataclasses.replace(cfg, decode=decode)
    shield = TraceShield(index, scorer, thr, tokenizer=tokenizer, top_sources=0)
    table = load_veto_table(veto_table)[0] if veto_table else None
    if "dpo" not in policies:
        raise ValueError("--policy dpo=DIR (the aligned policy) is required")
    wanted = _defenses(ev.defenses)
    defenses = [d for d in wanted if adb.DEFENSES[d].policy in policies and (table is not None or not adb.DEFENSES[d].veto)]
    if len(defenses) < len(wanted):
        log(f"  skipping defenses {sorted(set(wanted) - set(defenses))}: no cbd policy / veto table given")
    models = {name: _load_policy(cfg, d) for name, d in policies.items()}
    if ev.judge == "exact" and not forbidden:
        raise ValueError("the exact judge needs the forbidden strings (--forbidden); or set eval.judge=classifier")
    judge = make_judge(ev.judge, forbidden or None, ev.classifier_dir or None, window=ev.judge_window)
    adb_prompts = adb.load_adb(prompts, ev.max_prompts, tokenizer)
    qa_recs = _read_jsonl(Path(qa)) if qa else []
    qa_prompts = [adb.AdbPrompt(q["id"], q["id"], "benign_qa", "qa", q["prompt"], "comply") for q in qa_recs]
    judged, rows = adb.evaluate_defenses(models, tokenizer, adb_prompts + qa_prompts, cfg.decode, judge,
                                         defenses=defenses, refusal_text=REFUSAL, veto_table=table, shield=shield,
                                         progress=True, log=log)
    atomic_write_jsonl(out_dir / "completions.jsonl", rows)
    texts = [h["text"] for h in _read_jsonl(Path(heldout)) if h.get("split", "utility") == "utility"] if heldout else []
    report = build_report(cfg, judged, rows, qa_recs, models, tokenizer, texts, table, index, scorer, thr.tau,
                          adb_prompts, log)
    if forbidden:
        report["shield_flags"] = shield_flag_fragments(rows, forbidden)
    write_report(report, out_dir)
    return report


FRAGMENT_WORDS = 3


def shield_flag_fragments(rows: list[dict], forbidden: str | Path) -> dict:
    """Why TraceShield flags completions the judge calls safe: the share of them holding a
    ``FRAGMENT_WORDS``-word run of a forbidden string (a fragment too short for the judge's window),
    next to the same share among the safe completions it passes (traceshield defense, refuse prompts)."""
    from tracealign_jax.evaluation.judges import ExactContentJudge

    fragment = ExactContentJudge.from_jsonl(forbidden, FRAGMENT_WORDS)
    safe = [r for r in rows if r["defense"] == "traceshield" and r["expected"] == "refuse" and not r["raw_unsafe"]]
    out: dict = {"fragment_words": FRAGMENT_WORDS}
    for key, group in (("flagged", [r for r in safe if r["shield_refused"]]),
                       ("passed", [r for r in safe if not r["shield_refused"]])):
        hits = sum(fragment.match(r["raw_completion"]) is not None for r in group)
        out[key] = {"n": len(group), "with_fragment": hits, "share": hits / len(group) if group else None}
    return out


def evaluate_stage(cfg: Config, data_dir: Path, tokenizer: Any, index_dir: str, cal: dict, arrays: dict,
                   policy_dirs: dict[str, str], log: Callable[[str], None]) -> Stage:
    def run(out: Path) -> dict:
        report = run_adb_eval(cfg, prompts=data_dir / "adb.jsonl", policies=policy_dirs, index_dir=index_dir,
                              threshold=cal["threshold"], veto_table=arrays["veto_table"],
                              forbidden=data_dir / "forbidden.jsonl", qa=data_dir / "benign_qa.jsonl",
                              heldout=data_dir / "heldout.jsonl", out_dir=out, tokenizer=tokenizer, log=log)
        atomic_write_json(out / "report.json", report)
        return {"report_json": str(out / "report.json"), "completions": str(out / "completions.jsonl")}

    return run


def _defenses(names: Any) -> list[str]:
    names = list(names)
    return names if "none" in names else ["none"] + names


def export_stage(hf_dir: str, tokenizer: Any, data_dir: Path, log: Callable[[str], None]) -> Stage:
    """Reloads the exported policy with transformers (PyTorch) and compares logits with ours."""

    def run(out: Path) -> dict:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            log("[export] torch is not installed: skipping the transformers reload "
                "(install the test extra: pip install 'tracealign-jax[test]')")
            return {"hf_dir": hf_dir, "reloaded": False, "reason": "torch not installed"}
        import jax.numpy as jnp

        from tracealign_jax.hf_io import load_hf

        texts = [d["text"] for d in _read_jsonl(data_dir / "corpus.jsonl")[:4]]
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        model, _ = load_hf(hf_dir, progress=False)
        diff = 0.0
        for text in texts:  # one text at a time: no padding conventions to reconcile
            ids = np.asarray(tokenizer(text)["input_ids"], np.int32)[None]
            with torch.no_grad():
                theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
            ours, _ = model(jnp.asarray(ids), jnp.arange(ids.shape[1], dtype=jnp.int32)[None])
            diff = max(diff, float(np.max(np.abs(np.asarray(ours) - theirs))))
        log(f"[export] {hf_dir} reloaded with transformers {type(hf).__name__}: max |logit diff| = {diff:.2e}")
        return {"hf_dir": hf_dir, "reloaded": True, "architecture": type(hf).__name__, "max_abs_logit_diff": diff}

    return run
