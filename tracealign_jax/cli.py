"""The ``tracealign`` command: parse, call, print. Each subsystem registers its own subcommands.

A module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands with ``set_defaults(run=callable(args) -> int)``. Modules are listed only once their
commands work end to end.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "tracealign_jax.provenance.commands",
    "tracealign_jax.index.commands",
    "tracealign_jax.hf_io.commands",
    "tracealign_jax.aot.commands",
    "tracealign_jax.training.commands",
    "tracealign_jax.decoding.commands",
    "tracealign_jax.evaluation.commands",
    "tracealign_jax.realign.commands",
    "tracealign_jax.config_new",
)
# Which module registers each top-level command, so a run imports only its own module: a host-only
# command (``index query``, ``bci score``) then never imports JAX, Flax or tensorstore (start-up time).
COMMANDS: dict[str, str] = {
    **dict.fromkeys(("bci", "shield", "bound", "provenance"), "tracealign_jax.provenance.commands"),
    "index": "tracealign_jax.index.commands",
    "hf": "tracealign_jax.hf_io.commands",
    "compile-check": "tracealign_jax.aot.commands",
    **dict.fromkeys(("train", "export-hf"), "tracealign_jax.training.commands"),
    "decode": "tracealign_jax.decoding.commands",
    **dict.fromkeys(("demo", "eval", "data"), "tracealign_jax.evaluation.commands"),
    "realign": "tracealign_jax.realign.commands",
    "config": "tracealign_jax.config_new",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or (``command`` known) with only the module that registers it."""
    parser = argparse.ArgumentParser(
        prog="tracealign",
        description="Trace unsafe completions to their training data; defend with that provenance.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """``index query``, ``eval adb``, ``train``: the command and its action (each group's ``*_command`` dest)."""
    action = next((v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)), None)
    return f"{args.command} {action}" if action else args.command


def _one_line(err: BaseException) -> str:
    """The error's message on one line (library messages often span several); an OS error as ``path: reason``."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command. A user error (bad config, file, record, checkpoint) prints one line naming what
    is wrong and exits 2; ``TRACEALIGN_DEBUG=1`` re-raises it with its traceback instead."""
    import os

    from tracealign_jax.platform_env import quiet_libtpu_env, tpu_chips_present

    if not tpu_chips_present():
        quiet_libtpu_env()  # before any JAX import: libtpu's probes print INVALID_ARGUMENT lines on CPU/GPU hosts
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    from tracealign_jax.atomic_io import IntegrityError

    try:
        return int(args.run(args) or 0)
    # ValueError covers ConfigError, RecordError, JSON / UTF-8 decoding and the model's refusals; OSError a
    # missing file or disk full; IntegrityError a corrupted artifact.
    except (ValueError, OSError, IntegrityError) as err:
        if os.environ.get("TRACEALIGN_DEBUG"):
            raise
        print(f"tracealign {_command_name(args)}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
