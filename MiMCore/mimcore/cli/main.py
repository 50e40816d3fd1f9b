"""The ``mim`` command line: ``mim data samples``, ``mim pretrain``, ``mim reconstruct``.

Each command lives in its own module with an ``add_parser(subparsers)`` that registers
it and sets ``func``; a user error (:class:`~mimcore.errors.MimError`) is printed as
one clear message with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import os
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


#: exit code after the reader of our output went away (``mim ... | head``): 128 + SIGPIPE, as a
#: shell reports a program that SIGPIPE stopped
EXIT_BROKEN_PIPE = 141
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def sends_events(args: argparse.Namespace) -> bool:
    """Whether the command prints JSON events (then a failure is an ``error`` event too): every
    command with ``--progress json`` (pretrain, finetune, segment: bar|json|none; reconstruct:
    text|json), and ``mim models add --json``."""
    return getattr(args, "progress", None) == "json" or (
        getattr(args, "models_command", None) == "add" and getattr(args, "json", False) is True)


def _fail(args: argparse.Namespace | None, message: str) -> int:
    """Report a user error: an ``error`` event in JSON mode, the message on stderr; exit code 2."""
    if args is not None and sends_events(args):
        try:
            events.emit("error", message=message)
        except BrokenPipeError:
            pass
    print(f"mim: error: {message}", file=sys.stderr)
    return 2


def _stdout_gone() -> int:
    """The reader of stdout went away: stop quietly (Python's documented recipe: point stdout
    at devnull, so that the flush at exit does not fail again)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # stdout is not a file descriptor (a test's capture): nothing to flush at exit
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a broken pipe shows here, not at exit
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except MimError as e:
        return _fail(args, str(e))
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        return _fail(args, f"no space left on the device{where}. Free some space (or write to another "
                           "folder), then run the command again (training: with --resume)")
    except KeyboardInterrupt:
        print("mim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
