"""Subprocess entry for the multi-process and kill/resume training tests.

    python tests/_training_worker.py DATA OUT_DIR HISTORY_JSON [--set k=v ...] [--delay SECONDS]

Runs ``training.train`` on the toy config with the given overrides and writes this process's loss
history as JSON. ``--delay`` sleeps before each step so a test can SIGKILL it mid-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _training_toy import toy_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("history")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    from tracealign_jax.training import loop

    if args.delay:
        real = loop.to_device_batch

        def slow(batch, shardings):
            time.sleep(args.delay)
            return real(batch, shardings)

        loop.to_device_batch = slow
    cfg = toy_config(Path(args.data), Path(args.out), *args.overrides)
    result = loop.train(cfg, show_progress=False)
    Path(args.history).write_text(json.dumps({"history": result.history, "resumed_from": result.resumed_from}))


if __name__ == "__main__":
    main()
