"""Orbax checkpoints of the train state + data position: periodic/final, keep-last-N, async, any mesh.

A checkpoint step directory holds two items: ``state`` (the TrainState: params, optimizer, step,
reference params, non-finite counters) and ``data`` (the batch stream's JSON position); checkpoints
from before issue 19 also hold an ``rng`` item, which restore ignores. Restores go through
``abstract_train_state`` of the CURRENT mesh (``jax.ShapeDtypeStruct``s carrying the new
NamedShardings), so each process reads exactly its new shards, on any mesh shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tracealign_jax.config import CheckpointConfig
from tracealign_jax.training.state import TrainState


_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainState))


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
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)

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
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
            force=force,
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """(state, data position) of ``step`` (default latest), laid out as ``abstract_state`` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to restore")
        saved = set(self.manager.item_metadata(step)["state"].keys())
        if saved - _FIELDS:  # written before issue 19 (it held TrainState.rng): restore our fields only
            return self._restore_older(step, abstract_state, saved)
        got = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        )
        return got["state"], dict(got["data"])

    def _restore_older(self, step: int, abstract_state: TrainState, saved: set[str]) -> tuple[TrainState, dict[str, Any]]:
        """An older checkpoint with items TrainState no longer has: partial restore, extras ignored."""
        if missing := {f for f in _FIELDS if f not in saved and getattr(abstract_state, f) is not None}:
            raise ValueError(f"{self.dir}/{step}: checkpoint lacks {sorted(missing)}; it is not a TrainState checkpoint")
        target = {f: getattr(abstract_state, f) for f in _FIELDS}
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)  # fmt: skip
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            got = reader.restore(self.dir / str(step) / "state", args=args)
        data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        return TrainState(**{f: got[f] for f in _FIELDS}), dict(data)

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
