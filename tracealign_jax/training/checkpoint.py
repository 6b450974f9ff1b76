"""Orbax checkpoints of the train state + data position: periodic/final, keep-last-N, async, any mesh.

A checkpoint step directory holds two items: ``state`` (the TrainState without the veto table:
params, optimizer, step, RNG, reference params, non-finite counters) and ``data`` (the batch
stream's JSON position). Restores go through ``abstract_train_state`` of the CURRENT mesh, i.e.
``jax.ShapeDtypeStruct``s carrying the new NamedShardings, so each process reads exactly its new
shards (restoring onto another mesh shape works; nothing lands in the saved layout first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tracealign_jax.config import CheckpointConfig
from tracealign_jax.training.state import TrainState


class Checkpointer:
    """Thin owner of an ``ocp.CheckpointManager`` for TrainState + data position."""

    def __init__(self, cfg: CheckpointConfig, directory: str | Path | None = None):
        self.cfg = cfg
        self.dir = Path(directory or cfg.dir).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last if cfg.keep_last > 0 else None,
            save_interval_steps=1,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, final: bool = False) -> bool:
        every = self.cfg.every_steps
        return final or (every > 0 and step % every == 0)

    def save(self, step: int, state: TrainState, data_position: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving (async when configured); returns whether a save was started."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(veto=None)), data=ocp.args.JsonSave(data_position)),
            force=force,
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """(state, data position) of ``step`` (default latest), laid out as ``abstract_state`` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to restore")
        target = abstract_state.replace(veto=None)
        got = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        )
        return got["state"], dict(got["data"])

    def wait(self) -> None:
        """Blocks until async saves are durable (call before exiting)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str | Path, abstract_state: TrainState, step: int | None = None) -> Any:
    """Only the policy parameters of a checkpoint (for export / decoding), onto ``abstract_state``'s layout."""
    ckpt = Checkpointer(CheckpointConfig(dir=str(directory), async_save=False, keep_last=0))
    try:
        state, _ = ckpt.restore(abstract_state, step)
    finally:
        ckpt.close()
    return state.params


def tree_equal(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two pytrees of arrays (host comparison; for tests and diagnostics)."""
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
