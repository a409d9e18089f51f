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
    p.add_argument("--force", action="store_true",
                   help="replace summary.png / report.md / summary.json in --out DIR although "
                        "`devinterp report` did not write them")
    p.set_defaults(func=run)


_OWN = ("summary.png", "report.md", "summary.json")
_MARKER = ".devinterp-report"


def _check_out(out: str | None, force: bool) -> None:
    """--out must be a folder, and its summary files must be a report's own (or --force)."""
    from pathlib import Path

    from devinterp.cli._common import check_folder_arg
    from devinterp.errors import OutputExistsError

    check_folder_arg(out, "--out")
    if out is None or force:
        return
    folder = Path(out)
    clash = [n for n in _OWN if (folder / n).exists()]
    if clash and not (folder / _MARKER).exists() and not (folder / "results.jsonl").exists():
        raise OutputExistsError(f"--out {out} holds {', '.join(clash)} that `devinterp report` did not write: "
                                f"pass --force to replace them, or choose another --out")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from devinterp.posthoc.api import write_report

    _check_out(args.out, args.force)
    paths = write_report(args.path, args.out, title=args.title)
    if args.out is not None:
        (Path(args.out) / _MARKER).write_text("summary.png, report.md and summary.json here were written by "
                                              "`devinterp report`\n")
    for kind in ("png", "markdown", "json"):
        print(paths[kind])
    return 0
