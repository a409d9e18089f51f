"""``devinterp report PATH``: summary figure and markdown report from saved post-hoc results."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="render summary.png, report.md and summary.json from the results of `devinterp analyze`",
        description="Read the results that `devinterp analyze` saved for PATH (a snapshot store, a folder of "
        ".ckpt files, or the results folder itself) and render summary.png (loss, LLC with its band, head "
        "scores, transitions shaded), report.md and summary.json. Transitions come from transitions.json "
        "(detected now if it is missing).",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write (default: the results folder)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devinterp.posthoc.api import write_report

    paths = write_report(args.path, args.out, title=args.title)
    for kind in ("png", "markdown", "json"):
        print(paths[kind])
    return 0
