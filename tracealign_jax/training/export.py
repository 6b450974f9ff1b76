"""Training checkpoint -> Hugging Face checkpoint (the policy parameters only), via ``hf_io.save_hf``."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from tracealign_jax import sharding
from tracealign_jax.config import ConfigError, MeshConfig, load_config
from tracealign_jax.training.checkpoint import restore_params
from tracealign_jax.training.state import abstract_train_state, graphdef_and_abstract_params, model_arch


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


def export_checkpoint(checkpoint: Path, out: Path, *, config_path: str | None = None, step: int | None = None,
                      tokenizer_dir: str | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Restores the policy of ``checkpoint`` onto one device and writes it as a HF checkpoint."""
    import jax

    from tracealign_jax.hf_io import save_hf

    ckpt_dir, cfg_path = resolve_run(checkpoint, config_path)
    cfg = load_config(cfg_path)
    if cfg.loss.type == "trace":  # LoRA adapters: merged into the base on export
        from tracealign_jax.realign.train import export_trace_checkpoint

        return export_trace_checkpoint(ckpt_dir, cfg, out, step=step, tokenizer_dir=tokenizer_dir, dtype=dtype,
                                       overwrite=overwrite)  # fmt: skip
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, _ = graphdef_and_abstract_params(cfg, mesh, rules)
    params = restore_params(ckpt_dir, abstract_train_state(cfg, mesh, rules), step)
    model = nnx.merge(graphdef, params)
    tok = tokenizer_dir or cfg.data.tokenizer_dir or None
    return save_hf(model, model_arch(cfg.model), out, tokenizer_dir=tok, dtype=dtype, overwrite=overwrite, progress=False)
