"""The training loop: data -> sharded batches -> jitted step -> metrics / checkpoints, resumable.

    from tracealign_jax.config import load_config
    from tracealign_jax.training import train
    result = train(load_config("configs/tiny_cpu.yaml", ["data.train_path=prefs.jsonl"]))

The loop dispatches step N+1 before it reads step N's metrics to the host, so the device never
waits on logging. The checkpoint step number counts batches consumed (skipped non-finite steps
included), so resuming at checkpoint k replays exactly batches k, k+1, ... of the same order.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracealign_jax import sharding
from tracealign_jax.config import Config, ConfigError, to_dict, validate
from tracealign_jax.model import model_arch
from tracealign_jax.model.flops import train_step_flops
from tracealign_jax.pairs import TokenizedPairs, check_same_dataset, check_token_ids, load_pairs
from tracealign_jax.training.checkpoint import Checkpointer
from tracealign_jax.training.data import BatchStream
from tracealign_jax.training.metrics import MetricsWriter
from tracealign_jax.training.state import (
    TrainState,
    abstract_train_state,
    graphdef_and_abstract_params,
    init_train_state,
    initial_model,
    lora_base,
    model_params,
    state_shardings,
)
from tracealign_jax.training.step import batch_fields, batch_rows, batch_shardings, make_train_step, pair_layout, unembedded_tokens


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    graphdef: Any
    history: list[dict[str, float]]
    steps_run: int
    resumed_from: int | None
    num_skipped_records: int
    adapter_dir: Path | None = None  # LoRA: the PEFT adapter directory written at the end of the run


def to_device_batch(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Global host batch -> global sharded arrays; every process holds the same host batch and
    contributes the shards of its own devices (works single- and multi-process)."""
    return {k: sharding.to_global(batch[k], sh) for k, sh in shardings.items()}


def _load_veto(cfg: Config) -> tuple[Any, dict]:
    """(veto table, its meta) when CBD term (b) is on, else (None, {})."""
    if not cfg.loss.cbd_cont_weight or cfg.train.objective != "dpo":
        return None, {}
    if not cfg.loss.cbd_veto_table:
        raise ValueError("loss.cbd_cont_weight > 0 needs loss.cbd_veto_table (a provenance veto table directory)")
    from tracealign_jax.veto.store import load_veto_table

    return load_veto_table(cfg.loss.cbd_veto_table)


def _resolve_bci_scale(cfg: Config, bci: Any, veto_meta: dict) -> Config:
    """``loss.cbd_bci_scale`` = 0 means the tau the BCI arrays / veto table were built with."""
    loss = cfg.loss
    if loss.cbd_bci_scale > 0 or not (loss.cbd_data_weight or loss.cbd_cont_weight) or cfg.train.objective != "dpo":
        return cfg
    metas = (bci.meta if bci is not None else {}, veto_meta)
    settings = [m["bci_settings"] for m in metas if m.get("bci_settings")]
    if len(settings) == 2 and settings[0] != settings[1]:
        diff = sorted(k for k in set(settings[0]) | set(settings[1]) if settings[0].get(k) != settings[1].get(k))
        raise ConfigError("data.bci_path and loss.cbd_veto_table were scored under other BCI settings ("
                          + ", ".join(f"{k}: {settings[0].get(k)!r} vs {settings[1].get(k)!r}" for k in diff)
                          + "): rebuild one of them with the other's provenance settings")
    taus = [float(m["tau"]) for m in metas if m.get("tau")]
    if not taus:
        raise ValueError("loss.cbd_bci_scale = 0 takes tau from the BCI arrays or veto table, but neither records "
                         "one: set loss.cbd_bci_scale (nats, e.g. the calibrated tau)")
    if max(taus) - min(taus) > 1e-6 * max(taus):
        raise ValueError(f"the BCI arrays and the veto table were built with different tau ({taus[0]} vs {taus[1]}): "
                         "rebuild one of them, or set loss.cbd_bci_scale explicitly")
    return dataclasses.replace(cfg, loss=dataclasses.replace(loss, cbd_bci_scale=taus[0]))


def _check_tokenizers(cfg: Config, pairs: TokenizedPairs, vocab_size: int, artifacts: dict[str, dict]) -> None:
    """Provenance artifacts (per-token BCI store, veto table) hold token ids of the index's tokenizer:
    refuse them when it is not the data's tokenizer, or when their vocabulary exceeds the model's."""
    data_hash = ""
    if cfg.data.tokenizer_dir:
        from tracealign_jax.index.corpus import tokenizer_fingerprint

        try:
            data_hash = tokenizer_fingerprint(cfg.data.tokenizer_dir)[1]
        except FileNotFoundError:  # a slow tokenizer (no tokenizer.json): no index can have been built with it
            data_hash = ""
    for key, meta in artifacts.items():
        theirs = meta.get("tokenizer_hash")
        if data_hash and theirs and theirs != data_hash:
            raise ConfigError(f"{key}: built with tokenizer {theirs}, but data.tokenizer_dir {cfg.data.tokenizer_dir} "
                              f"has hash {data_hash}: rebuild it from an index of the data's tokenizer")
        if int(meta.get("vocab_size", 0)) > vocab_size:
            raise ConfigError(f"{key}: built over a vocabulary of {meta['vocab_size']} tokens, the model has "
                              f"{vocab_size}: the index tokenizer is not the model's")


def _check_batch_divides(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> None:
    """The batch rows are split over the mesh's batch axes: refuse a batch they do not divide, naming
    the settings, before anything is compiled (jax would raise a bare IndivisibleError at step 1)."""
    spec = next(iter(batch_shardings(cfg, mesh, rules).values())).spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    rows = batch_rows(cfg)
    if rows % ways:
        per = ("1 row per example" if cfg.train.objective == "sft" else
               f"{rows // cfg.train.batch_size} row{'s' * (rows > cfg.train.batch_size)} per pair ({pair_layout(cfg)} layout)")
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} ({rows} rows, {per}) is not divisible over the "
                          f"batch axes {' x '.join(f'mesh.{a}={mesh.shape[a]}' for a in axes)}: choose a batch whose "
                          f"rows are a multiple of {ways}")


def _save_peft(cfg: Config, graphdef: Any, state: TrainState, out_dir: Path) -> Path:
    """The run's adapters as a PEFT LoRA directory ``<output_dir>/peft_adapter`` (process 0 writes)."""
    from flax import nnx

    from tracealign_jax.hf_io import flat_params
    from tracealign_jax.model.lora import save_peft_adapter

    flat = flat_params(nnx.merge(graphdef, state.params, state.frozen))
    return save_peft_adapter(flat, model_arch(cfg.model), cfg.lora, out_dir / "peft_adapter",
                             base_model_name_or_path=cfg.model.hf_dir, overwrite=True)  # fmt: skip


def train(cfg: Config, *, pairs: TokenizedPairs | None = None, stop_after: int | None = None,
          show_progress: bool = True) -> TrainResult:  # fmt: skip
    """Runs (or resumes) training to ``cfg.train.steps``; ``stop_after`` ends early after that many
    steps in this call (tests use it to simulate an interrupted run).

    With LoRA (``lora.rank`` > 0) only the adapters train and are checkpointed; the base is rebuilt
    on resume; the adapters are written as ``<output_dir>/peft_adapter`` at the end.
    ``loss.type: trace`` reads each pair's category and impact weight (``realign.data.pair_fields``)."""
    validate(cfg)
    sharding.initialize_distributed(cfg.mesh)
    mesh = sharding.build_mesh(cfg.mesh)
    rules = sharding.resolve_rules(cfg.mesh.rules)
    _check_batch_divides(cfg, mesh, rules)
    sft = cfg.train.objective == "sft"
    out_dir = Path(cfg.train.output_dir)
    if pairs is None:
        pairs = load_pairs(cfg.data, sft=sft, show_progress=show_progress and jax.process_index() == 0)
    bci = None
    if cfg.loss.cbd_data_weight and not sft and not cfg.data.bci_path:
        raise ValueError("loss.cbd_data_weight > 0 needs per-token BCI arrays: set data.bci_path "
                         "(written by `tracealign provenance token-bci`)")
    if cfg.data.bci_path and not sft:
        from tracealign_jax.response_store import ResponseArrayReader

        bci = ResponseArrayReader(cfg.data.bci_path)
        check_same_dataset(bci.meta, pairs, f"data.bci_path {cfg.data.bci_path}")
        if len(bci) != len(pairs):
            raise ValueError(f"data.bci_path: {len(bci)} examples but the dataset has {len(pairs)}")
    pair_cols = {}
    if cfg.loss.type == "trace":
        from tracealign_jax.realign.data import pair_fields

        pair_cols = dict(zip(("category", "weight"), pair_fields(cfg.data.train_path, pairs.arrays["line"])))
    veto, veto_meta = _load_veto(cfg)
    if veto is not None:  # replicated once here, so the step never re-transfers it
        veto = jax.device_put(veto, NamedSharding(mesh, PartitionSpec()))
    cfg = _resolve_bci_scale(cfg, bci, veto_meta)
    arch = model_arch(cfg.model)
    check_token_ids(pairs, arch.vocab_size, cfg.data.train_path, "the model's")
    _check_tokenizers(cfg, pairs, arch.vocab_size, {"data.bci_path": bci.meta if bci is not None else {},
                                                    "loss.cbd_veto_table": veto_meta})
    ckpt = Checkpointer(cfg.checkpoint, cfg.checkpoint.dir or out_dir / "checkpoints")
    ckpt.write_arch(arch.to_hf_dict())
    resumed_from = ckpt.latest_step()
    graphdef, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    if resumed_from is not None:
        state, position = ckpt.restore(abstract_train_state(cfg, mesh, rules))
        if cfg.lora.rank:  # adapter-only checkpoints
            state = state.replace(frozen=lora_base(cfg, mesh, rules))
    else:
        graphdef, state = init_train_state(cfg, mesh, rules, model=initial_model(cfg, mesh, rules))
        position = None
    ref_reader = None
    if not sft and cfg.loss.reference == "precomputed":
        from tracealign_jax.training import reference

        ref_reader = reference.open_reference(cfg, pairs)
        if ref_reader is None:
            if resumed_from is not None:
                raise ValueError("reference log-probs store missing on resume; the reference params are not in the checkpoint")
            ref_reader = reference.precompute_reference(cfg, graphdef, model_params(state.params, state.frozen), pairs,
                                                        mesh, rules, cfg.train.batch_size)  # fmt: skip
    stream = BatchStream(pairs, cfg.data, cfg.train.batch_size, sft=sft, bci=bci, ref_logps=ref_reader,
                         layout=pair_layout(cfg))
    if position is not None:
        stream.restore(position)
    step_fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    b_sh = batch_shardings(cfg, mesh, rules)
    fields = batch_fields(cfg)
    start = resumed_from or 0
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    writer = MetricsWriter(out_dir, cfg.train.steps, start, show_progress=show_progress)
    if writer.enabled and resumed_from is None:
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    history: list[dict[str, float]] = []
    pending = None  # (step number, metrics on device, batch shape, dispatch time)
    last_time = time.perf_counter()

    def drain(p: tuple) -> None:
        nonlocal last_time
        n, m, shape, valid_tokens = p
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        m["step_time_s"] = dt
        m["tokens_per_s"] = valid_tokens / dt
        if cfg.train.peak_flops_per_device > 0:
            ref_forward = cfg.loss.type == "trace" or (not sft and cfg.loss.reference == "in_step")
            flops = train_step_flops(arch, shape[0] * shape[1], shape[1], ref_forward=ref_forward, frozen_base=cfg.lora.rank > 0,
                                     unembedded=unembedded_tokens(cfg, *shape))  # fmt: skip
            m["mfu"] = flops / dt / (cfg.train.peak_flops_per_device * jax.device_count())
        history.append(dict(m, step=n))
        if n % max(cfg.train.log_every, 1) == 0 or n == end:
            writer.write(n, m)
        writer.advance()
        if m["nonfinite_in_row"] >= cfg.train.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"step {n}: {int(m['nonfinite_in_row'])} consecutive non-finite steps "
                f"(loss={m.get('loss/total')}, grad_norm={m.get('grad_norm')}, lr={m.get('lr')}); "
                "lower train.learning_rate, check the data for empty responses, or use float32"
            )

    try:
        for n in range(start + 1, end + 1):
            host = next(stream)
            host.update({k: v[host["index"]] for k, v in pair_cols.items()})
            position = stream.position()
            batch = to_device_batch({k: host[k] for k in fields}, b_sh)
            state, metrics = step_fn(state, batch, veto)
            if pending is not None:
                drain(pending)  # step n is already queued: reading n-1 does not stall the device
            pending = (n, metrics, host["tokens"].shape, float(host["valid"].sum()))
            if ckpt.should_save(n, final=n == cfg.train.steps):
                ckpt.save(n, state, position)
        if pending is not None:
            drain(pending)
    finally:
        ckpt.close()
        writer.close()
    adapter_dir = None
    if cfg.lora.rank and end == cfg.train.steps and jax.process_index() == 0:
        adapter_dir = _save_peft(cfg, graphdef, state, out_dir)
    return TrainResult(state, graphdef, history, end - start, resumed_from, pairs.num_skipped, adapter_dir)
