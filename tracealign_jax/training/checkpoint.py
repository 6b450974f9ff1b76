"""Orbax checkpoints of the train state + data position: periodic/final, keep-last-N, async, any mesh.

Integrity: once a step's save is complete, ``checksums/<step>.json`` lists every file of the step
with its size and SHA-256; ``restore`` verifies them first (by default) and refuses a missing,
truncated or modified file, naming it (Orbax itself would load a flipped weight silently, and a
truncated ``_METADATA`` surfaces as a bare JSONDecodeError). ``model_config.json`` holds the
architecture the run was trained with, so export and decoding rebuild exactly that model.

A checkpoint step directory holds two items: ``state`` (the TrainState: params, optimizer, step,
reference params, non-finite counters; with LoRA the adapters and their optimizer only, never the
frozen base: ``TrainState.frozen`` is dropped on save and comes back None on restore) and ``data`` (the batch stream's JSON position); checkpoints
from before issue 19 also hold an ``rng`` item, which restore ignores. Restores go through
``abstract_train_state`` of the CURRENT mesh (``jax.ShapeDtypeStruct``s carrying the new
NamedShardings), so each process reads exactly its new shards, on any mesh shape.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from tracealign_jax.atomic_io import IntegrityError, atomic_write_json, sha256_file
from tracealign_jax.config import CheckpointConfig
from tracealign_jax.training.state import TrainState

CHECKSUMS_DIR = "checksums"  # <checkpoint dir>/checksums/<step>.json: {relpath: {bytes, sha256}} of the step's files
ARCH_FILE = "model_config.json"  # the architecture (HF config.json fields) the checkpoints were trained with


def _step_files(step_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.relative_to(step_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(step_dir.rglob("*")) if p.is_file()}


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
        self._unsummed: list[int] = []  # steps saved (maybe still in flight) whose checksums are not written yet

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
        self._write_checksums()  # the previous save must be complete before the next one starts anyway
        if getattr(state, "frozen", None) is not None:  # LoRA: adapter-only, the base is never checkpointed
            state = state.replace(frozen=None)
        started = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
            force=force,
        )
        if started:
            self._unsummed.append(step)
        return started

    def _write_checksums(self) -> None:
        """Waits for in-flight saves, then records the checksums of every step saved since the last call."""
        if not self._unsummed:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsummed:
                step_dir = self.dir / str(step)
                if step_dir.is_dir():
                    atomic_write_json(self.dir / CHECKSUMS_DIR / f"{step}.json", {"step": step, "files": _step_files(step_dir)})
            kept = {str(s) for s in self.manager.all_steps()}
            for old in (self.dir / CHECKSUMS_DIR).glob("*.json"):  # steps that keep_last deleted
                if old.stem not in kept:
                    old.unlink(missing_ok=True)
        self._unsummed = []

    def verify(self, step: int, *, hashes: bool = True) -> Callable[[], None]:
        """Checks step ``step``'s files against ``checksums/<step>.json``; IntegrityError names the file.

        Presence and sizes are checked now; the SHA-256s too with ``hashes``, else the returned callable
        checks them (``restore`` runs it in a thread while Orbax reads, so the hashing overlaps the
        restore). A step without a checksum file (saved by older code, or killed between Orbax's commit
        and the checksum write) is restored unverified with a warning on stderr."""
        step_dir = self.dir / str(step)
        record = self.dir / CHECKSUMS_DIR / f"{step}.json"
        if not record.is_file():
            print(f"warning: {record}: missing; step {step} is restored without checksum verification", file=sys.stderr)
            return lambda: None
        try:
            listed = json.loads(record.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise IntegrityError(f"{record}: unreadable checksum record ({err}); delete it to restore unverified") from None
        on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
        for rel, info in listed.items():
            p = step_dir / rel
            if not p.is_file():
                raise IntegrityError(f"{p}: listed in {record} but missing (an incomplete or damaged checkpoint)")
            if p.stat().st_size != info["bytes"]:
                raise IntegrityError(f"{p}: {p.stat().st_size} bytes on disk, {info['bytes']} when saved (truncated or replaced)")
        extra = sorted(on_disk - set(listed))
        if extra:
            raise IntegrityError(f"{step_dir / extra[0]}: not part of the saved checkpoint (added after the save)")

        def check_hashes() -> None:
            for rel, info in listed.items():
                if sha256_file(step_dir / rel) != info["sha256"]:
                    raise IntegrityError(f"{step_dir / rel}: SHA-256 differs from {record} (corrupted or modified after the save)")

        if hashes:
            check_hashes()
            return lambda: None
        return check_hashes

    def write_arch(self, arch: dict[str, Any]) -> None:
        """Records the run's architecture once (process 0); a different one for the same directory is refused."""
        saved = self.read_arch()
        if saved is not None:
            diff = sorted(k for k in set(saved) | set(arch) if saved.get(k) != arch.get(k))
            if diff:
                raise IntegrityError(f"{self.dir / ARCH_FILE}: these checkpoints were trained with another architecture "
                                     f"({', '.join(f'{k}: {saved.get(k)!r} vs now {arch.get(k)!r}' for k in diff)}); "
                                     "use the run's own model settings, or another checkpoint.dir")
        elif jax.process_index() == 0:
            atomic_write_json(self.dir / ARCH_FILE, arch)

    def read_arch(self) -> dict[str, Any] | None:
        """The recorded architecture (HF config.json fields), or None for checkpoints saved without one."""
        return recorded_arch(self.dir)

    def restore(self, abstract_state: TrainState, step: int | None = None, *,
                verify: bool = True) -> tuple[TrainState, dict[str, Any]]:  # fmt: skip
        """(state, data position) of ``step`` (default latest), laid out as ``abstract_state`` says;
        the step's files are checked against their checksums first unless ``verify=False``."""
        step = self.latest_step() if step is None else step
        abstract_state = abstract_state.replace(frozen=None)
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to restore")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"{self.dir}: no checkpoint for step {step} (have {self.all_steps()})")
        hashes = ThreadPoolExecutor(1).submit(self.verify(step, hashes=False)) if verify else None
        try:
            saved = set(self.manager.item_metadata(step)["state"].keys())
            if saved - _FIELDS:  # written before issue 19 (it held TrainState.rng): restore our fields only
                got = self._restore_older(step, abstract_state, saved)
            else:
                got = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                  data=ocp.args.JsonRestore()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:  # a damaged file Orbax does not name
            if hashes is not None:
                hashes.result()  # a checksum mismatch names the file: report that first
            raise IntegrityError(f"{self.dir / str(step)}: unreadable checkpoint ({type(err).__name__}: {err})") from None
        except BaseException:
            if hashes is not None:
                hashes.result()
            raise
        if hashes is not None:
            hashes.result()  # raises IntegrityError: the restored state is dropped, never returned
        return got["state"], dict(got["data"])

    def _restore_older(self, step: int, abstract_state: TrainState, saved: set[str]) -> dict[str, Any]:
        """An older checkpoint with items TrainState no longer has: partial restore, extras ignored."""
        if missing := {f for f in _FIELDS if f not in saved and getattr(abstract_state, f) is not None}:
            raise ValueError(f"{self.dir}/{step}: checkpoint lacks {sorted(missing)}; it is not a TrainState checkpoint")
        target = {f: getattr(abstract_state, f) for f in _FIELDS}
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)  # fmt: skip
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            got = reader.restore(self.dir / str(step) / "state", args=args)
        data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        return {"state": TrainState(**{f: got[f] for f in _FIELDS}), "data": data}

    def wait(self) -> None:
        """Blocks until async saves are durable (call before exiting)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._write_checksums()
        self.manager.close()


def restore_params(directory: str | Path, abstract_state: TrainState, step: int | None = None) -> Any:
    """Only the policy parameters of a checkpoint (for export / decoding), onto ``abstract_state``'s layout."""
    ckpt = open_checkpoints(directory)
    try:
        state, _ = ckpt.restore(abstract_state, step)
    finally:
        ckpt.close()
    return state.params


def open_checkpoints(directory: str | Path) -> Checkpointer:
    """A read-side Checkpointer of an existing checkpoint directory (refuses a missing one, never creates it)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    return Checkpointer(CheckpointConfig(dir=str(directory), async_save=False, keep_last=0))


def recorded_arch(directory: str | Path) -> dict[str, Any] | None:
    """The architecture a checkpoint directory records (``model_config.json``), or None."""
    path = Path(directory) / ARCH_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def tree_equal(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two pytrees of arrays (host comparison; for tests and diagnostics)."""
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
