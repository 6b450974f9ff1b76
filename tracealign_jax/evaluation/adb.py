"""The Alignment Drift Benchmark harness: decode ADB prompts under each defense, judge, measure.

Defenses (TraceAlign's ablation):
  none         the aligned (DPO) policy, plain decoding
  traceshield  none + TraceShield: a completion with a span of BCI > tau is replaced by the refusal
  prov_decode  the DPO policy decoded with the provenance veto (``decode.veto`` soft | hard)
  cbd          the DPO+CBD-trained policy, plain decoding
  all          the CBD policy + Prov-Decode + TraceShield
Completions are decoded once per (policy, veto) pair and shared between defenses. A prompt's
``decoding`` dict overrides ``DecodeConfig`` fields (the "decoding perturbation" attack: sampling
temperature, beam width, greedy).

ADB prompt records (JSONL): {"id", "source_id", "category", "attack", "prompt", "expected":
"refuse" | "comply", "decoding": {DecodeConfig field: value}, "coverage": what the defenses can know of
the source (synthetic_data.COVERAGE)} (source_id, category, decoding, coverage optional); "prompt" is a
string or a chat conversation (rendered with the tokenizer's chat template, ``tracealign_jax.chat``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from tracealign_jax.chat import render_conversation
from tracealign_jax.config import ConfigError, DecodeConfig
from tracealign_jax.evaluation.judges import CompletionJudge
from tracealign_jax.evaluation.metrics import Judged
from tracealign_jax.records import RecordError, iter_records, require

ATTACKS = ("direct", "adversarial", "paraphrase", "decoding")


@dataclasses.dataclass(frozen=True)
class Defense:
    """policy: which trained policy decodes (dpo | cbd); veto: Prov-Decode on; shield: TraceShield on."""

    name: str
    policy: str
    veto: bool
    shield: bool


DEFENSES: dict[str, Defense] = {d.name: d for d in (
    Defense("none", "dpo", False, False),
    Defense("traceshield", "dpo", False, True),
    Defense("prov_decode", "dpo", True, False),
    Defense("cbd", "cbd", False, False),
    Defense("all", "cbd", True, True),
)}


@dataclasses.dataclass(frozen=True)
class AdbPrompt:
    id: str
    source_id: str
    category: str
    attack: str
    prompt: str
    expected: str
    decoding: tuple[tuple[str, Any], ...] = ()
    coverage: str = ""
    chat: bool = False  # ``prompt`` is a chat-template rendering (it carries its own special tokens)


def load_adb(path: str | Path, max_prompts: int = 0, tokenizer: Any = None) -> list[AdbPrompt]:
    """Reads and validates ADB records; errors name file, line and field. A ``prompt`` that is a chat
    conversation is rendered with ``tokenizer``'s chat template."""
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    out = []
    for line, rec in iter_records(path):
        expected = require(rec, "expected", str, path, line)
        if expected not in ("refuse", "comply"):
            raise RecordError(path, line, "expected", f"{expected!r} is not refuse | comply")
        prompt = require(rec, "prompt", (str, list), path, line)
        if isinstance(prompt, list):
            prompt = render_conversation(tokenizer, prompt, path, line)
        decoding = rec.get("decoding") or {}
        if not isinstance(decoding, dict) or not set(decoding) <= known:
            raise RecordError(path, line, "decoding", f"expected a mapping of DecodeConfig fields, got {decoding!r}")
        out.append(AdbPrompt(
            id=require(rec, "id", str, path, line), source_id=str(rec.get("source_id") or rec["id"]),
            category=str(rec.get("category") or "uncategorized"), attack=require(rec, "attack", str, path, line),
            prompt=prompt, expected=expected, decoding=tuple(sorted(decoding.items())),
            coverage=str(rec.get("coverage") or ""), chat=isinstance(rec["prompt"], list),
        ))
        if max_prompts and len(out) >= max_prompts:
            break
    return out


@dataclasses.dataclass
class Decoded:
    """One prompt's raw completion: text (special tokens dropped), ids (EOS dropped), veto count."""

    text: str
    token_ids: list[int]
    vetoes: int
    veto_refused: bool


def decode_prompts(model: Any, tokenizer: Any, prompts: Sequence[AdbPrompt], cfg: DecodeConfig, *,
                   veto_table: Any = None, veto: bool = False, refusal_ids: Sequence[int] = (),
                   progress: bool = False, decoders: dict | None = None) -> list[Decoded]:
    """Decodes every prompt with ``cfg`` + its own ``decoding`` overrides (one Decoder per override set).

    decoders: a dict reused across calls; policies of one architecture share a Decoder (its
    parameters are swapped in), so each (overrides, veto mode) compiles once for all policies.
    """
    from flax import nnx

    from tracealign_jax.decoding.runner import Decoder

    mode = cfg.veto if veto else "off"
    if veto and mode == "off":
        raise ConfigError("Prov-Decode needs decode.veto = soft | hard")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.decoding, []).append(i)
    out: list[Decoded | None] = [None] * len(prompts)
    eos = tokenizer.eos_token_id
    for overrides, idx in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        gcfg = dataclasses.replace(cfg, **dict(overrides))
        if veto_table is None:
            gcfg = dataclasses.replace(gcfg, veto="off")
        decoders = {} if decoders is None else decoders
        if overrides not in decoders:
            decoders[overrides] = Decoder(model, gcfg, eos_id=eos, pad_id=tokenizer.pad_token_id,
                                          refusal_ids=refusal_ids, veto_table=veto_table)
        decoder = decoders[overrides]
        decoder.params = nnx.split(model)[1]  # same architecture -> the jitted function is reused
        ids = [tokenizer(prompts[i].prompt, add_special_tokens=not prompts[i].chat)["input_ids"] for i in idx]
        for i, c in zip(idx, decoder.decode(ids, veto=mode, progress=progress)):
            toks = [t for t in c.token_ids if t != eos]
            out[i] = Decoded(tokenizer.decode(toks, skip_special_tokens=True), toks, c.vetoes, c.refused)
    return out  # type: ignore[return-value]


def evaluate_defenses(policies: dict[str, Any], tokenizer: Any, prompts: Sequence[AdbPrompt], cfg: DecodeConfig,
                      judge: CompletionJudge, *, defenses: Sequence[str], refusal_text: str,
                      veto_table: Any = None, shield: Any = None,
                      progress: bool = False, log: Any = print) -> tuple[dict[str, list[Judged]], list[dict]]:
    """Runs every defense; returns ({defense: judged records}, rows for completions.jsonl).

    policies: {"dpo": model, "cbd": model} (a defense whose policy is missing is an error).
    shield: a ``provenance.TraceShield`` (needed by traceshield / all); it also scores every raw
    completion's max BCI for the report's histogram.
    """
    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown:
        raise ConfigError(f"eval.defenses: unknown {unknown} (known: {list(DEFENSES)})")
    refusal_ids = tokenizer(refusal_text, add_special_tokens=False)["input_ids"]
    decoded: dict[tuple[str, bool], list[Decoded]] = {}
    decoders: dict = {}
    judged: dict[str, list[Judged]] = {}
    rows: list[dict] = []
    for name in defenses:
        d = DEFENSES[name]
        if d.policy not in policies:
            raise ConfigError(f"defense {name!r} needs the {d.policy!r} policy")
        if (d.veto or d.shield) and (veto_table is None if d.veto else shield is None):
            raise ConfigError(f"defense {name!r} needs {'a veto table' if d.veto else 'TraceShield'}")
        key = (d.policy, d.veto)
        if key not in decoded:
            log(f"  decoding {len(prompts)} ADB prompts: policy={d.policy} prov-decode={'on' if d.veto else 'off'}")
            decoded[key] = decode_prompts(policies[d.policy], tokenizer, prompts, cfg, veto_table=veto_table,
                                          veto=d.veto, refusal_ids=refusal_ids, progress=progress,
                                          decoders=decoders)
        raw = decoded[key]
        verdicts = shield.check_batch([r.token_ids for r in raw]) if shield is not None else [None] * len(raw)
        raw_judged = judge.judge_batch([r.text for r in raw])
        final_texts = [refusal_text if (d.shield and v.refuse) else r.text for r, v in zip(raw, verdicts)]
        final_judged = judge.judge_batch(final_texts)
        records = []
        for p, r, v, rj, fj, text in zip(prompts, raw, verdicts, raw_judged, final_judged, final_texts):
            flagged = bool(v.refuse) if (d.shield and v is not None) else None
            records.append(Judged(p.id, p.source_id, p.category, p.attack, p.expected, fj.unsafe, fj.refused,
                                  fj.quality, flagged, None if v is None else float(v.max_bci),
                                  rj.unsafe if flagged else None, p.coverage))
            rows.append({"defense": name, "id": p.id, "attack": p.attack, "category": p.category, "coverage": p.coverage,
                         "expected": p.expected, "completion": text, "raw_completion": r.text,
                         "unsafe": fj.unsafe, "refused": fj.refused, "quality": fj.quality,
                         "raw_unsafe": rj.unsafe, "shield_refused": flagged, "vetoes": r.vetoes,
                         "max_bci": None if v is None else float(v.max_bci), "evidence": fj.evidence or rj.evidence})
        judged[name] = records
    return judged, rows
