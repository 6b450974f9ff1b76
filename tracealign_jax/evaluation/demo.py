"""The end-to-end drift demo (``tracealign demo``, ``./launch/demo.sh``): every stage real, all cached.

  data       the fictional default data (shipped copy, or regenerated at other sizes / seeds)
  tokenizer  a byte-level BPE trained on the corpus (``tokenizers``)
  sft        a tiny Llama trained by SFT on the corpus until it memorizes it, forbidden procedures
             included (the "pretraining" that plants the unsafe beliefs); exported to HF format
  index      the TraceIndex over the corpus, with the policy labels as metadata
  calibrate  BCI threshold tau on held-out compliant text (target false-positive rate)
  arrays     per-token BCI of the preference set (tensorstore) and the provenance veto table
  dpo        DPO alignment from the SFT model (reference = the SFT model)
  cbd        DPO + Contrastive Belief Deconfliction (both terms), same data, steps and seed
  evaluate   the ADB split under none / TraceShield / Prov-Decode / CBD / all; benign QA accuracy;
             perplexity on held-out benign text; the drift bound next to measured drift
  report     report.json, report.md and the PNG plots
  export     the CBD policy reloaded with ``transformers`` (PyTorch) and its logits compared to ours
  realign    a policy shift (configs/policies/demo_shift.yaml): triage of the preference pairs, impact
             weights, TRACE / naive-relabel DPO / NPO-only / re-annotated DPO (oracle) on LoRA adapters
             from the DPO policy, side by side (``evaluation.realign_demo``)

Stage keys hash the config sections each stage reads (``stages.StageRunner``), so a second run
skips what is finished and a changed setting re-runs only what depends on it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from tracealign_jax.atomic_io import atomic_write_jsonl, verify_manifest
from tracealign_jax.config import Config, EvalConfig, LossConfig, to_dict
from tracealign_jax.evaluation import synthetic_data as sd
from tracealign_jax.evaluation.stages import StageRunner

Log = Callable[[str], None]
# The EvalConfig fields the data stage reads (its cache key): changing a training or defense
# setting must not regenerate the data and retrain everything downstream of it.
DATA_FIELDS = ("data_dir", "data_seed", "per_category", "benign_per_template", "facts", "heldout_facts")
# The EvalConfig fields only the realign stage reads: not part of the evaluate stage's key.
REALIGN_FIELDS = ("realign_policy", "realign_lora_rank", "realign_steps", "realign_learning_rate")
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "configs" / "policies" / "demo_shift.yaml"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _data_stage(ev: EvalConfig) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        defaults = EvalConfig()
        sizes = ("per_category", "benign_per_template", "facts", "heldout_facts")
        if ev.data_dir:
            if (Path(ev.data_dir) / "manifest.json").is_file():
                verify_manifest(ev.data_dir)
            for p in Path(ev.data_dir).glob("*.jsonl"):
                shutil.copy2(p, out / p.name)
        elif ev.data_seed == 0 and all(getattr(ev, k) == getattr(defaults, k) for k in sizes):
            verify_manifest(sd.DEFAULT_DATA_DIR)
            for p in sd.DEFAULT_DATA_DIR.glob("*.jsonl"):
                shutil.copy2(p, out / p.name)
        else:
            splits = sd.generate(**{k: getattr(ev, k) for k in sizes}, seed=ev.data_seed)
            for name, records in splits.items():
                atomic_write_jsonl(out / f"{name}.jsonl", records)
        # SFT view of the corpus: the request is the prompt, the rest is the response to learn
        sft = []
        unindexed = out / "unindexed.jsonl"
        for doc in _read_jsonl(out / "corpus.jsonl") + (_read_jsonl(unindexed) if unindexed.is_file() else []):
            head, sep, tail = doc["text"].partition(sd.PROMPT_TEMPLATE.split("{request}")[1])
            sft.append({"prompt": head + sep, "response": tail} if sep else {"prompt": "", "response": doc["text"]})
        atomic_write_jsonl(out / "sft.jsonl", sft)
        counts = {p.stem: len(_read_jsonl(p)) for p in sorted(out.glob("*.jsonl"))}
        return {"dir": str(out), "counts": counts}

    return run


def _tokenizer_stage(data_dir: Path, vocab_size: int) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        from tracealign_jax.evaluation.bpe import train_bpe_tokenizer

        texts = [d["text"] for name in ("corpus", "unindexed") if (data_dir / f"{name}.jsonl").is_file()
                 for d in _read_jsonl(data_dir / f"{name}.jsonl")]
        train_bpe_tokenizer(texts, out / "tokenizer", vocab_size=vocab_size)
        return {"dir": str(out / "tokenizer")}

    return run


def _train_stage(cfg: Config, tok_dir: str, hf_out_name: str = "hf") -> Callable[[Path], dict]:
    """Trains with ``cfg`` (outputs under the stage dir) and exports the policy to HF format."""

    def run(out: Path) -> dict:
        from tracealign_jax.hf_io import save_hf
        from tracealign_jax.training import train
        from tracealign_jax.model import model_arch

        c = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, output_dir=str(out / "train")),
            checkpoint=dataclasses.replace(cfg.checkpoint, dir=str(out / "checkpoints")),
            data=dataclasses.replace(cfg.data, cache_dir=str(out / "data_cache")))
        t0 = time.perf_counter()
        result = train(c, show_progress=True)
        seconds = time.perf_counter() - t0
        policy = result.state.params
        if c.lora.rank:  # adapters only in the state: fold them into the frozen base
            from flax import nnx

            from tracealign_jax.hf_io import flat_params
            from tracealign_jax.model.lora import merge_adapter

            policy = merge_adapter(flat_params(nnx.merge(result.graphdef, result.state.params, result.state.frozen)), c.lora)
        save_hf(policy, model_arch(c.model), out / hf_out_name, tokenizer_dir=tok_dir, progress=False)
        last = result.history[-1] if result.history else {}
        return {"hf_dir": str(out / hf_out_name), "train_seconds": seconds, "steps": result.steps_run,
                "final_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float))}}

    return run


def stage_configs(cfg: Config, tok_dir: str, data_dir: Path, vocab_size: int) -> dict[str, Config]:
    """The per-stage training configs derived from the demo config (SFT, DPO, DPO+CBD)."""
    ev = cfg.eval
    arch = dict(cfg.model.arch, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=arch),
                               data=dataclasses.replace(cfg.data, tokenizer_dir=tok_dir))
    sft = dataclasses.replace(
        base, data=dataclasses.replace(base.data, train_path=str(data_dir / "sft.jsonl")),
        train=dataclasses.replace(base.train, objective="sft", steps=ev.sft_steps, learning_rate=ev.sft_learning_rate,
                                  batch_size=ev.sft_batch_size),
        loss=LossConfig())  # SFT reads no loss setting: tuning DPO / CBD must not invalidate the SFT stage
    dpo = dataclasses.replace(
        base, data=dataclasses.replace(base.data, train_path=str(data_dir / "preferences.jsonl")),
        train=dataclasses.replace(base.train, objective="dpo", steps=ev.dpo_steps, learning_rate=ev.dpo_learning_rate),
        loss=dataclasses.replace(base.loss, cbd_data_weight=0.0, cbd_cont_weight=0.0))
    return {"sft": sft, "dpo": dpo}


def run_demo(cfg: Config, out_dir: str | Path, *, force: bool = False, log: Log = print) -> dict[str, Any]:
    """Runs (or resumes) the whole pipeline under ``out_dir``; returns the report dict."""
    t_start = time.perf_counter()
    runner = StageRunner(out_dir, log=log, force=force)
    ev = cfg.eval
    data_settings = {k: getattr(ev, k) for k in DATA_FIELDS}
    data_key, data = runner.run("data", dict(data_settings, generator=sd.GENERATOR_VERSION), (), _data_stage(ev))
    data_dir = Path(data["dir"])
    tok_key, tok = runner.run("tokenizer", {"vocab": ev.vocab_size}, (data_key,), _tokenizer_stage(data_dir, ev.vocab_size))
    tok_dir = tok["dir"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    cfgs = stage_configs(cfg, tok_dir, data_dir, len(tokenizer))

    def train_settings(c: Config) -> dict:
        return {k: to_dict(getattr(c, k)) for k in ("model", "data", "loss", "train", "mesh")}

    sft_key, sft = runner.run("sft", train_settings(cfgs["sft"]), (tok_key,), _train_stage(cfgs["sft"], tok_dir))
    from tracealign_jax.evaluation import pipeline

    idx_key, idx = runner.run("index", {}, (tok_key,), pipeline.index_stage(data_dir, tok_dir))
    prov = to_dict(cfg.provenance)
    cal_key, cal = runner.run("calibrate", {"prov": prov, "set": pipeline.CALIBRATION_SET}, (idx_key,), pipeline.calibrate_stage(cfg, idx["dir"], data_dir, tokenizer))
    dpo_cfg = dataclasses.replace(cfgs["dpo"], model=dataclasses.replace(cfgs["dpo"].model, hf_dir=sft["hf_dir"]))
    arr_key, arrays = runner.run("arrays", {"prov": prov, "data": to_dict(dpo_cfg.data)}, (cal_key,),
                                 pipeline.arrays_stage(dpo_cfg, idx["dir"], cal["tau"]))
    dpo_key, dpo = runner.run("dpo", train_settings(dpo_cfg), (sft_key,), _train_stage(dpo_cfg, tok_dir))
    cbd_cfg = dataclasses.replace(
        dpo_cfg, data=dataclasses.replace(dpo_cfg.data, bci_path=arrays["token_bci"]),
        loss=dataclasses.replace(dpo_cfg.loss, cbd_data_weight=ev.cbd_data_weight, cbd_cont_weight=ev.cbd_cont_weight,
                                 cbd_veto_table=arrays["veto_table"]))
    cbd_key, cbd = runner.run("cbd", train_settings(cbd_cfg), (sft_key, arr_key), _train_stage(cbd_cfg, tok_dir))
    decode_cfg = dataclasses.replace(cfg.decode, tau=cal["tau"]) if cfg.decode.tau <= 0 else cfg.decode
    eval_cfg = dataclasses.replace(cfg, decode=decode_cfg)
    ev_key, evaluation = runner.run(
        "evaluate", {"decode": to_dict(decode_cfg), "eval": {k: v for k, v in to_dict(ev).items() if k not in REALIGN_FIELDS},
                     "prov": prov},
        (dpo_key, cbd_key, arr_key, cal_key),
        pipeline.evaluate_stage(eval_cfg, data_dir, tokenizer, idx["dir"], cal, arrays,
                                {"dpo": dpo["hf_dir"], "cbd": cbd["hf_dir"]}, log))
    from tracealign_jax.evaluation.report import ordered

    report = json.loads(Path(evaluation["report_json"]).read_text())
    report["defenses"] = ordered(report["defenses"])
    report["meta"] = dict(report.get("meta", {}), **{
        "sft_final_loss": sft["final_metrics"].get("loss/total"),
        "dpo_reward_accuracy": dpo["final_metrics"].get("rewards/accuracies"),
        "cbd_reward_accuracy": cbd["final_metrics"].get("rewards/accuracies"),
        "tau": cal["tau"], "calibration_measured_fpr": cal.get("measured_fpr"),
        "veto_spans": arrays.get("num_spans"),
    })
    _, exported = runner.run("export", {}, (cbd_key,), pipeline.export_stage(cbd["hf_dir"], tokenizer, data_dir, log))
    report["export"] = exported
    report["realign"] = _realign(runner, cfg, eval_cfg, dpo_cfg, data_dir, tokenizer, tok_dir, dpo_key, dpo["hf_dir"], log)
    report["meta"]["stage_seconds"] = {k: round(v, 1) for k, v in runner.timings.items()}
    report["meta"]["cached_stages"] = runner.skipped
    report["meta"]["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    from tracealign_jax.evaluation.report import main_table, write_report

    write_report(report, Path(out_dir) / "report")
    log("\n" + main_table(report))
    log("\nre-alignment (policy shift, held-out prompts):\n" + report["realign"]["markdown"])
    log(f"\nreport: {Path(out_dir) / 'report' / 'report.md'}  (wall {report['meta']['wall_seconds']:.0f} s)")
    return report


def _realign(runner: StageRunner, cfg: Config, eval_cfg: Config, dpo_cfg: Config, data_dir: Path, tokenizer: Any,
             tok_dir: str, dpo_key: str, aligned_hf: str, log: Log) -> dict:
    """The realign stage (cached): keyed by the policy file's judge config and the settings it trains with."""
    from tracealign_jax.evaluation.realign_demo import realign_stage
    from tracealign_jax.realign.judge import RulesJudge

    ev = cfg.eval
    policy = Path(ev.realign_policy) if ev.realign_policy else DEFAULT_POLICY
    if not policy.is_file():
        raise FileNotFoundError(f"eval.realign_policy: {policy} not found")
    stage_cfg = dataclasses.replace(dpo_cfg, decode=eval_cfg.decode)
    settings = {"policy": RulesJudge.from_yaml(policy).config(), "decode": to_dict(eval_cfg.decode),
                "eval": {k: getattr(ev, k) for k in REALIGN_FIELDS[1:] + ("judge_window",)},
                "realign": to_dict(cfg.realign), "train": to_dict(dpo_cfg.train), "loss": to_dict(dpo_cfg.loss)}
    _, result = runner.run("realign", settings, (dpo_key,),
                           realign_stage(stage_cfg, data_dir, tokenizer, aligned_hf, policy,
                                         lambda c: _train_stage(c, tok_dir), log))  # fmt: skip
    return result
