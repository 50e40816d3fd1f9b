"""The ``mim`` command line: ``mim data samples``, ``mim pretrain``, ``mim reconstruct``.

Each command lives in its own module with an ``add_parser(subparsers)`` that registers
it and sets ``func``; a user error (:class:`~mimcore.errors.MimError`) is printed as
one clear message with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mimcore import __version__, events
from mimcore.errors import MimError

COMMAND_MODULES = (
    "mimcore.cli.data_cmd",
    "mimcore.cli.pretrain_cmd",
    "mimcore.cli.reconstruct_cmd",
    "mimcore.cli.models_cmd",
    "mimcore.cli.finetune_cmd",
    "mimcore.cli.segment_cmd",
    "mimcore.cli.evaluate_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mim",
        description="MiM (Mask in Mask) hierarchical masked pre-training for 3D CT.",
    )
    parser.add_argument("--version", action="version", version=f"mimcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MimError as e:
        if getattr(args, "progress", None) == "json":
            events.emit("error", message=str(e))
        print(f"mim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
