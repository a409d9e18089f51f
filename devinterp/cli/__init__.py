"""The ``devinterp`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs the command.
Modules are discovered automatically, so adding a command never touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from devinterp.errors import DevinterpError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devinterp",
        description="Developmental interpretability: snapshots, LLC, circuits and phase transitions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are one line on stderr (exit statuses: see :mod:`devinterp.cli._common`)."""
    from devinterp.cli._common import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, exit_status, one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here at the latest
        return status
    except BrokenPipeError:  # e.g. `devinterp snapshots PATH | head`: the reader left, stop quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (DevinterpError, OSError) as exc:
        _print_error(args.command, one_line(exc))
        return exit_status(exc)
    except KeyboardInterrupt:
        _print_error(args.command, "interrupted; finished work is kept", prefix="")
        return EXIT_INTERRUPTED


def _print_error(command: str, message: str, prefix: str = "error: ") -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        _silence_stdout()
    print(f"devinterp {command}: {prefix}{message}", file=sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
