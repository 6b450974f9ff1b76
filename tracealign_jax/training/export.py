"""Training checkpoint -> Hugging Face checkpoint (the policy parameters only, LoRA adapters merged), via ``hf_io.save_hf``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from tracealign_jax import sharding
from tracealign_jax.config import Config, ConfigError, load_config
from tracealign_jax.model import model_arch
from tracealign_jax.training.checkpoint import recorded_arch, restore_params
from tracealign_jax.training.state import abstract_train_state, graphdef_and_abstract_params, lora_base


def resolve_run(checkpoint: Path, config_path: str | None) -> tuple[Path, Path]:
    """(checkpoints dir, config.yaml) from a run dir or its ``checkpoints/`` dir."""
    checkpoint = Path(checkpoint)
    ckpt_dir = checkpoint / "checkpoints" if (checkpoint / "checkpoints").is_dir() else checkpoint
    if config_path is not None:
        return ckpt_dir, Path(config_path)
    for cand in (checkpoint / "config.yaml", ckpt_dir.parent / "config.yaml"):
        if cand.is_file():
            return ckpt_dir, cand
    raise ConfigError(f"{checkpoint}: no config.yaml next to the checkpoints; pass --config")


def with_recorded_arch(cfg: Config, ckpt_dir: str | Path) -> Config:
    """``cfg`` with the architecture the checkpoints in ``ckpt_dir`` were trained with (``model_config.json``),
    in place of what the YAML's ``model.hf_dir`` / ``model.arch`` say today (they may have changed, or
    differ in a field, e.g. rms_norm_eps, that would change every logit without any error)."""
    recorded = recorded_arch(ckpt_dir)
    if recorded is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_dir="", arch=recorded))


def export_checkpoint(checkpoint: Path, out: Path, *, config_path: str | None = None, step: int | None = None,
                      tokenizer_dir: str | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Restores the policy of ``checkpoint`` onto the run's mesh (every process's devices in a multi-host run)
    and writes it as a HF checkpoint; ``save_hf`` gathers one tensor at a time, never the whole model.

    LoRA runs (adapter-only checkpoints): the base is rebuilt as the run built it (``model.hf_dir``,
    or the seed), the adapters are merged into it (``W + scale A B``), and the adapters alone are
    also written as a PEFT directory ``<out>/peft_adapter``."""
    from tracealign_jax.hf_io import flat_params, save_hf

    ckpt_dir, cfg_path = resolve_run(checkpoint, config_path)
    cfg = load_config(cfg_path)
    if not cfg.lora.rank:  # a LoRA run's base weights come from model.hf_dir itself
        cfg = with_recorded_arch(cfg, ckpt_dir)
    sharding.initialize_distributed(cfg.mesh)
    mesh = sharding.build_mesh(cfg.mesh)
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, _ = graphdef_and_abstract_params(cfg, mesh, rules)
    params = restore_params(ckpt_dir, abstract_train_state(cfg, mesh, rules), step)
    arch = model_arch(cfg.model)
    tok = tokenizer_dir or cfg.data.tokenizer_dir or None
    if not cfg.lora.rank:
        return save_hf(nnx.merge(graphdef, params), arch, out, tokenizer_dir=tok, dtype=dtype, overwrite=overwrite,
                       progress=False)  # fmt: skip
    from tracealign_jax.model.lora import merge_adapter, save_peft_adapter

    flat = flat_params(nnx.merge(graphdef, params, lora_base(cfg, mesh, rules)))
    path = save_hf(merge_adapter(flat, cfg.lora), arch, out, tokenizer_dir=tok, dtype=dtype, overwrite=overwrite,
                   progress=False)  # fmt: skip
    save_peft_adapter(flat, arch, cfg.lora, path / "peft_adapter", base_model_name_or_path=cfg.model.hf_dir,
                      overwrite=True)  # fmt: skip
    return path
