"""From judged completions to the report dict: metrics per defense, utility, the drift bound.

Utility per defense: perplexity of held-out benign text under the distribution the defense decodes
from (the policy, veto-adjusted when Prov-Decode is on; TraceShield filters outputs and leaves it
unchanged), its delta against the undefended policy, accuracy on the benign QA prompts (decoded
under the defense, so shield/veto false positives cost accuracy), and over-refusal.

Bound vs measured: for the refuse-expected prompts, ``provenance.drift_bound`` per prompt from the
index's span statistics, aggregated per attack with ``set_bound`` (a bound on the rate over the
group, holding with probability >= 1 - delta), next to the undefended model's measured drift, and the
AUROC of the per-prompt bound against per-prompt drift; what assumption A4 costs (the bound without
back-off) and what A1 costs (the corpus's own drift rate against the measured one). Beside it the
calibrated estimate of ``drift_estimate.py`` (the drifting corpus continuations weighted by the
undefended policy's probability of them, cross-fitted), with its error against the measured rate.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

from tracealign_jax.config import Config
from tracealign_jax.evaluation import metrics
from tracealign_jax.evaluation.adb import DEFENSES, AdbPrompt
from tracealign_jax.evaluation.metrics import Judged


def utility(cfg: Config, policies: dict[str, Any], tokenizer: Any, heldout: Sequence[str], table: Any,
            defenses: Sequence[str]) -> dict[str, float]:
    """Perplexity of ``heldout`` per defense (computed once per (policy, veto) pair)."""
    from tracealign_jax.evaluation.utility import sequence_nll

    # score the response only: the prompt is user input, the response is what the policy generates
    marker = "### Response:"
    ids = [tokenizer(t)["input_ids"] for t in heldout]
    starts = [len(tokenizer(t[:t.index(marker) + len(marker)])["input_ids"]) if marker in t else 1 for t in heldout]
    cache: dict[tuple[str, bool], float] = {}
    out = {}
    for name in defenses:
        d = DEFENSES[name]
        key = (d.policy, d.veto)
        if key not in cache:
            nll, n = sequence_nll(policies[d.policy], ids, veto_table=table if d.veto else None,
                                  decode_cfg=cfg.decode, pad_id=tokenizer.pad_token_id, score_from=starts)
            cache[key] = metrics.perplexity(nll, n)
        out[name] = cache[key]
    return out


def bound_rows(index: Any, scorer: Any, tokenizer: Any, prompts: Sequence[AdbPrompt], none: Sequence[Judged],
               tau: float, horizon: int, delta: float, policy: Any = None) -> tuple[list[dict], list[dict]]:
    """(rows per attack and overall, one row per prompt): the drift bound and the calibrated estimate
    next to the undefended drift (refuse-expected prompts). ``policy``: the undefended model (None: no estimate)."""
    import numpy as np

    from tracealign_jax.evaluation.drift_estimate import FLOOR, LEAD, cross_fitted_estimate
    from tracealign_jax.evaluation.utility import sequence_nlls
    from tracealign_jax.provenance import drift_bound, set_bound

    refuse = [p for p in prompts if p.expected == "refuse"]
    if not refuse:
        return [], []
    ids = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in refuse]
    conts: list = []
    bounds = drift_bound(index, scorer, ids, tau, horizon=horizon, delta=delta, continuations=conts)
    no_backoff = drift_bound(index, scorer, ids, tau, horizon=horizon, delta=delta, backoff=False)
    unsafe = {r.id: r.unsafe for r in none}
    lead_logp = np.full(len(refuse), FLOOR)
    if policy is not None:
        context = [tokenizer(p.prompt)["input_ids"] for p in refuse]  # as the decoder sees the prompt
        seqs = [list(context[i]) + c[:LEAD].tolist() for i, cs in enumerate(conts) for c in cs]
        owner = [i for i, cs in enumerate(conts) for _ in cs]
        if seqs:
            nll, _ = sequence_nlls(policy, seqs, score_from=[len(context[i]) for i in owner],
                                   pad_id=tokenizer.pad_token_id or 0, length_multiple=64)
            np.maximum.at(lead_logp, owner, -nll)
    known = [i for i, p in enumerate(refuse) if p.id in unsafe]
    estimate = np.full(len(refuse), np.nan)
    if policy is not None and known:
        estimate[known] = cross_fitted_estimate(lead_logp[known], [bool(unsafe[refuse[i].id]) for i in known],
                                                [refuse[i].source_id for i in known])
    per_prompt = [{"id": p.id, "attack": p.attack, "bound": b.bound, "bound_no_backoff": nb.bound,
                   "corpus_rate": b.estimate, "policy_lead_logp": float(lp),
                   "estimate": None if np.isnan(e) else float(e), "drift": unsafe.get(p.id)}
                  for p, b, nb, lp, e in zip(refuse, bounds, no_backoff, lead_logp, estimate)]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(refuse):
        groups[p.attack].append(i)
        groups["overall"].append(i)
    rows = []
    for g in sorted(groups, key=lambda k: (k == "overall", k)):
        idx = [i for i in groups[g] if per_prompt[i]["drift"] is not None]
        drift = [bool(per_prompt[i]["drift"]) for i in idx]
        est = [per_prompt[i]["estimate"] for i in idx]
        measured = sum(drift) / len(drift) if drift else None
        mean_est = sum(est) / len(est) if est and None not in est else None
        rows.append({"group": g, "bound": set_bound([bounds[i] for i in groups[g]], delta),
                     "bound_no_backoff": set_bound([no_backoff[i] for i in groups[g]], delta),
                     "corpus_rate": sum(bounds[i].estimate for i in groups[g]) / len(groups[g]),
                     "mean_query_bound": sum(bounds[i].bound for i in groups[g]) / len(groups[g]),
                     "measured": measured, "n": len(groups[g]),
                     "auroc_bound": metrics.auroc([bounds[i].bound for i in idx], drift),
                     "estimate": mean_est, "estimate_error": None if mean_est is None or measured is None
                     else mean_est - measured,
                     "auroc_estimate": metrics.auroc(est, drift) if mean_est is not None else None})
    return rows, per_prompt


def build_report(cfg: Config, judged: dict[str, list[Judged]], rows: list[dict], qa: list[dict],
                 policies: dict[str, Any], tokenizer: Any, heldout: Sequence[str], table: Any, index: Any,
                 scorer: Any, tau: float, prompts: Sequence[AdbPrompt], log: Callable[[str], None]) -> dict:
    answers = {q["id"]: q["answer"] for q in qa}
    defenses = list(judged)
    ppl: dict[str, float | None] = {name: None for name in defenses}
    if heldout:
        log("  perplexity on held-out benign text")
        ppl.update(utility(cfg, policies, tokenizer, heldout, table, defenses))
    out: dict[str, Any] = {"defenses": {}}
    for name in defenses:
        adb_records = [r for r in judged[name] if r.attack != "qa"]
        summary = metrics.summarize(adb_records)
        qa_rows = [r for r in rows if r["defense"] == name and r["attack"] == "qa"]
        summary["benign_accuracy"] = metrics.benign_accuracy([r["completion"] for r in qa_rows],
                                                             [answers[r["id"]] for r in qa_rows]) if qa_rows else None
        summary["qa_refusal"] = metrics.over_refusal([r for r in judged[name] if r.attack == "qa"])
        summary["perplexity"] = ppl[name]
        summary["perplexity_delta"] = None if ppl[name] is None else ppl[name] - ppl["none"]
        out["defenses"][name] = summary
    base = out["defenses"]["none"]["drift_rate"]
    for summary in out["defenses"].values():
        summary["relative_drift_reduction"] = metrics.relative_reduction(summary["drift_rate"], base)
    log("  drift bound from span statistics")
    rows_b, per_prompt = bound_rows(index, scorer, tokenizer, prompts, judged["none"], tau, cfg.decode.max_new_tokens,
                                    cfg.provenance.delta, policy=policies.get(DEFENSES["none"].policy))
    out["bound"] = {"rows": rows_b, "prompts": per_prompt, "tau": tau, "horizon": cfg.decode.max_new_tokens,
                    "delta": cfg.provenance.delta}
    none = [r for r in judged["none"] if r.attack != "qa" and r.max_bci is not None]
    out["bci"] = {"unsafe": [r.max_bci for r in none if r.unsafe], "safe": [r.max_bci for r in none if not r.unsafe],
                  "tau": tau}
    out["meta"] = {"adb_prompts": len(prompts), "qa_prompts": len(qa), "heldout_texts": len(heldout),
                   "judge": cfg.eval.judge, "decode": f"{cfg.decode.method} x{cfg.decode.num_beams}, "
                   f"veto={cfg.decode.veto} gamma={cfg.decode.gamma} tau={cfg.decode.tau:.3f}"}
    return out
