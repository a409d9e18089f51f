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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DevinterpError as exc:
        print(f"devinterp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"devinterp {args.command}: interrupted; finished work is kept", file=sys.stderr)
        return 130
