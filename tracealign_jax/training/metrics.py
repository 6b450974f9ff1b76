"""Training metrics: a writer to JSONL + TensorBoard + tqdm (FLOPs for MFU: ``model.flops``).

Only process 0 writes. TensorBoard event files come from tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax



def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrites ``path`` (atomically) without rows of steps > ``step``: the steps a killed run logged after
    its last checkpoint, which the resumed run is about to log again. A torn last line is dropped too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= step and line.endswith("\n")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        from tracealign_jax.atomic_io import atomic_write_text

        atomic_write_text(path, "".join(kept))


class MetricsWriter:
    """Appends one JSON line per logged step to ``<dir>/metrics.jsonl`` and mirrors scalars to
    TensorBoard event files in ``<dir>/tb``; shows a tqdm bar with loss / accuracy / tokens/s."""

    def __init__(self, out_dir: str | Path, total_steps: int, initial_step: int = 0, enabled: bool | None = None,
                 show_progress: bool = True):  # fmt: skip
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.out_dir = Path(out_dir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _drop_rows_after(self.out_dir / "metrics.jsonl", initial_step)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        # A resumed run replays the steps after its checkpoint: TensorBoard drops the old events of those
        # steps (purge_step), metrics.jsonl its old rows (above), so no step is logged twice.
        self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=initial_step + 1)
        if show_progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: float(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, int(step))
        if self._bar is not None:
            shown = {"loss": row.get("loss/total"), "acc": row.get("rewards/accuracies"), "tok/s": row.get("tokens_per_s")}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()
        if self._bar is not None:
            self._bar.close()
