"""Sharded DPO-family / SFT training with the CBD loss: functional, jitted, multi-host, resumable.

Public API::

    train(cfg) -> TrainResult                       the loop (data, step, metrics, checkpoints, resume)
    losses.dpo_objective / preference_loss / sft_objective / cbd_data_loss / cbd_continuation_loss
    token_logprobs(h_BxLxD, unembed_DxV, tokens_BxL, scored_slots(tokens_BxL, branch, loss_mask, size), chunk=...)
    TrainState, init_train_state(cfg, mesh, rules) -> (graphdef, state), abstract_train_state(cfg, mesh, rules)
    make_train_step(cfg, graphdef, mesh, rules, state_shardings) -> jitted train_step(state, batch, veto)
    train_step_fn_and_shardings(cfg, mesh, rules, bucket_len) -> (jitted step, abstract state, abstract batch)
    abstract_batch(cfg, mesh, rules, bucket_len);  BatchStream(pairs.load_pairs(DataConfig), ...);  Checkpointer

The command line (``tracealign train``, ``tracealign export-hf``) is in README.md; from Python:
``train(load_config(path, overrides))``. Re-running a command resumes from its latest checkpoint.
"""

import importlib
from typing import Any

_HOMES = {
    "Checkpointer": "checkpoint", "BatchStream": "data", "build_batch": "data",
    "scored_slots": "logprobs", "token_logprobs": "logprobs", "NonFiniteLossError": "loop", "TrainResult": "loop", "train": "loop",
    "TrainState": "state", "abstract_train_state": "state", "init_train_state": "state", "make_optimizer": "state",
    "abstract_batch": "step", "make_train_step": "step", "train_step": "step", "train_step_fn_and_shardings": "step",
}  # fmt: skip
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Loads a name's module on first use, so ``training.step`` can be imported without the loop
    (and its Orbax / tensorstore imports)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
