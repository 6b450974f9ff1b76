"""TRACE training on LoRA adapters (``loss.type: trace``): data -> sharded batches -> ``trace_lora_step``
-> metrics / adapter-only checkpoints -> a PEFT adapter directory, resumable.

    cfg = load_config("configs/tiny_cpu.yaml", ["loss.type=trace", "lora.rank=8", "data.train_path=weighted.jsonl"])
    result = train_trace(cfg)

Data: ``realign impact``'s output (or ``realign triage``'s: weights then default to 1 on every
conflict, i.e. TRACE without impact weighting), read through ``training.data`` like DPO pairs; each
record's ``category`` and ``weight_mean1`` are matched to its tokenized pair by line number.
The reference is the frozen base (the merged graph with B = 0); checkpoints hold only the adapter
state and the data position (Orbax, ``<output_dir>/checkpoints`` or ``checkpoint.dir``); the base
is reloaded from ``model.hf_dir`` (or re-initialised from ``train.seed``) on resume. At the end the
adapters are written as ``<output_dir>/peft_adapter`` (``peft`` loads it onto the HF base).

Not yet merged into ``training.loop``'s single loop: that loop's state and data layout are being
restructured; this module is its LoRA/TRACE counterpart until then (``training.loop.train``
dispatches here for ``loss.type: trace``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tracealign_jax import sharding
from tracealign_jax.config import Config, ConfigError, to_dict
from tracealign_jax.realign.triage import CODES, RETAIN
from tracealign_jax.records import RecordError, iter_records


@dataclasses.dataclass
class TraceResult:
    state: Any
    graphdef: Any
    base: Any
    history: list[dict[str, float]]
    steps_run: int
    resumed_from: int | None
    adapter_dir: Path | None
    num_skipped_records: int = 0


def pair_fields(path: str | Path, lines_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(category int32[N], weight float32[N]) of the tokenized pairs, from their source records by line.

    ``category`` is required (retain | invert | suppress); ``weight_mean1`` defaults to 1 on conflicts.
    """
    by_line: dict[int, tuple[int, float]] = {}
    for line, rec in iter_records(path):
        name = rec.get("category")
        if name not in CODES:
            raise RecordError(path, line, "category", f"{name!r} is not one of {sorted(CODES)} (run `tracealign realign triage`)")
        w = rec.get("weight_mean1", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise RecordError(path, line, "weight_mean1", f"expected a number >= 0, got {w!r}")
        by_line[line] = (CODES[name], float(w) if CODES[name] != RETAIN else 0.0)
    got = [by_line[int(x)] for x in lines_N]
    return np.asarray([c for c, _ in got], np.int32), np.asarray([w for _, w in got], np.float32)


def _base_model(cfg: Config) -> Any:
    from tracealign_jax.realign.pipeline import _reference_model

    return _reference_model(cfg)


def train_trace(cfg: Config, *, stop_after: int | None = None, show_progress: bool = True) -> TraceResult:
    """Runs (or resumes) TRACE on LoRA adapters to ``cfg.train.steps``."""
    from tracealign_jax.model import lora as L
    from tracealign_jax.realign.step import init_lora_state, make_trace_lora_step
    from tracealign_jax.pairs import load_pairs
    from tracealign_jax.training.data import BatchStream
    from tracealign_jax.training.loop import to_device_batch
    from tracealign_jax.training.metrics import MetricsWriter

    if cfg.lora.rank <= 0:
        raise ConfigError("loss.type=trace trains LoRA adapters: set lora.rank > 0")
    if cfg.train.micro_batches != 1:
        raise ConfigError("loss.type=trace: train.micro_batches must be 1 (no gradient accumulation yet)")
    sharding.initialize_distributed(cfg.mesh)
    mesh = sharding.build_mesh(cfg.mesh)
    rules = sharding.resolve_rules(cfg.mesh.rules)
    out_dir = Path(cfg.train.output_dir)
    pairs = load_pairs(cfg.data, show_progress=show_progress and jax.process_index() == 0)
    category_N, weight_N = pair_fields(cfg.data.train_path, pairs.arrays["line"])

    model = L.add_lora(_base_model(cfg), cfg.lora, seed=cfg.train.seed)
    graphdef, adapter, base = L.split_adapter(model)
    step_fn, st_sh, b_sh, batch_sh = make_trace_lora_step(graphdef, adapter, base, mesh, rules, rc=cfg.realign,
                                                          tc=cfg.train, dropout=cfg.lora.dropout > 0,
                                                          chunk=cfg.train.logprob_chunk)  # fmt: skip
    base = jax.device_put(base, b_sh)
    ckpt_dir = Path(cfg.checkpoint.dir or out_dir / "checkpoints").absolute()
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep_last if cfg.checkpoint.keep_last > 0 else None, create=True,
        enable_async_checkpointing=cfg.checkpoint.async_save), item_names=("state", "data"))  # fmt: skip
    fresh = init_lora_state(adapter, cfg.train)
    resumed_from = manager.latest_step()
    stream = BatchStream(pairs, cfg.data, cfg.train.batch_size)
    if resumed_from is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), fresh, st_sh)
        got = manager.restore(resumed_from, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                    data=ocp.args.JsonRestore()))  # fmt: skip
        state = got["state"]
        stream.restore(dict(got["data"]))
    else:
        state = jax.device_put(fresh, st_sh)
    start = resumed_from or 0
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    writer = MetricsWriter(out_dir, cfg.train.steps, start, show_progress=show_progress)
    if writer.enabled and resumed_from is None:
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    history: list[dict[str, float]] = []
    pending = None
    last = time.perf_counter()

    def drain(p: tuple) -> None:
        nonlocal last
        n, m = p
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        m["step_time_s"], last = now - last, now
        history.append(dict(m, step=n))
        if n % max(cfg.train.log_every, 1) == 0 or n == end:
            writer.write(n, m)
        writer.advance()

    try:
        for n in range(start + 1, end + 1):
            host = next(stream)
            idx = host["index"]
            host = dict(host, category=category_N[idx], weight=weight_N[idx])
            state, metrics = step_fn(state, base, to_device_batch({k: host[k] for k in batch_sh}, batch_sh))
            if pending is not None:
                drain(pending)
            pending = (n, metrics)
            every = cfg.checkpoint.every_steps
            if (n == cfg.train.steps or (every > 0 and n % every == 0)) and n not in manager.all_steps():
                manager.save(n, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(stream.position())))  # fmt: skip
        if pending is not None:
            drain(pending)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    adapter_dir = None
    if end == cfg.train.steps and jax.process_index() == 0:
        from flax import nnx

        from tracealign_jax.hf_io import flat_params

        full = nnx.merge(graphdef, state.adapter, base)
        adapter_dir = L.save_peft_adapter(flat_params(full), model.arch, cfg.lora, out_dir / "peft_adapter",
                                          base_model_name_or_path=cfg.model.hf_dir, overwrite=True)  # fmt: skip
    return TraceResult(state, graphdef, base, history, end - start, resumed_from, adapter_dir, pairs.num_skipped)



def export_trace_checkpoint(ckpt_dir: str | Path, cfg: Config, out: str | Path, *, step: int | None = None,
                            tokenizer_dir: str | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """The base with a TRACE run's adapters merged in (``W + scale A B``), written as a HF checkpoint.

    The base is rebuilt from ``cfg.model`` (as the run did); the adapter state comes from the Orbax
    checkpoint ``step`` (default: latest) of ``ckpt_dir``, restored onto one device.
    """
    from flax import nnx

    from tracealign_jax.hf_io import flat_params, save_hf
    from tracealign_jax.model import lora as L
    from tracealign_jax.realign.step import init_lora_state

    model = L.add_lora(_base_model(cfg), cfg.lora, seed=cfg.train.seed)
    graphdef, adapter, base = L.split_adapter(model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(lambda a: init_lora_state(a, cfg.train), adapter))  # fmt: skip
    manager = ocp.CheckpointManager(Path(ckpt_dir).absolute(), item_names=("state", "data"))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to export")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    finally:
        manager.close()
    merged = L.merge_adapter(flat_params(nnx.merge(graphdef, state.adapter, base)), cfg.lora)
    tok = tokenizer_dir or cfg.data.tokenizer_dir or None
    return save_hf(merged, model.arch, out, tokenizer_dir=tok, dtype=dtype, overwrite=overwrite, progress=False)
