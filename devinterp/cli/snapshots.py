"""``devinterp snapshots PATH`` (list) and ``devinterp verify PATH`` (check every file)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from devinterp.store import SnapshotStore


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "snapshots",
        help="list the snapshots of a store (or of a folder of Lightning .ckpt files)",
        description="Table of the snapshots in PATH: step, file size, epoch, samples seen, train loss "
        "and wall time since the first snapshot; a file that is missing or shorter than recorded is marked "
        "(exit 1; `devinterp verify PATH` checks every checksum). PATH is a snapshot store (local or fsspec "
        "URL) or a folder of .ckpt files written by Lightning's ModelCheckpoint.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print one JSON record per snapshot instead")
    p.set_defaults(func=run)

    v = subparsers.add_parser(
        "verify",
        help="check every snapshot file's size, checksum and readability",
        description="Read every snapshot listed in PATH's index and check it. Exit 0 if all are fine, "
        "1 with the problems named otherwise. Leftovers of interrupted writes are reported as notes.",
    )
    v.add_argument("path", metavar="PATH")
    v.add_argument("--repair", action="store_true",
                   help="rebuild index.jsonl from the snapshot files that pass their checksums (the old "
                   "index is kept as index.jsonl.damaged-<time>; no file is deleted), then verify again")
    v.set_defaults(func=run_verify)


def _fmt_size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def run(args: argparse.Namespace) -> int:
    store = SnapshotStore.open(args.path)
    steps = store.steps()
    status = {step: store.file_status(step) for step in steps}
    bad = {step: s for step, s in status.items() if s}
    damaged = store.damaged()
    if args.json:
        for step in steps:
            print(json.dumps({**dict(store.meta(step)), "status": status[step] or "ok"}))
        for p in damaged:
            print(json.dumps({"kind": "damaged", "file": p.file, "status": "unreadable", "message": p.message}))
        return _marked(store, bad, damaged)
    info = store.run_info()
    print(f"{store.root}: {len(steps)} snapshot(s)"
          + (f", model {info['model_class']}" if info.get("model_class") else ""))
    if steps:
        t0 = next((store.meta(s).get("wall_time") for s in steps if store.meta(s).get("wall_time")), None)
        rows = [("step", "size", "epoch", "samples", "train_loss", "wall_time", "file")]
        for step in steps:
            m = store.meta(step)
            wall = m.get("wall_time")
            rows.append((
                str(step),
                _fmt_size(m.get("bytes")),
                _fmt(m.get("epoch")),
                _fmt(m.get("samples_seen")),
                _fmt(m.get("train_loss"), ".4g"),
                f"+{wall - t0:.1f}s" if isinstance(wall, (int, float)) and t0 is not None else "-",
                str(m.get("file")) + (f"  <- {_shout(status[step])}" if status[step] else ""),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            cells = [c.rjust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
            print("  ".join(cells))
    for p in damaged:
        print(f"  UNREADABLE {p.file} (left out: {p.message})")
    return _marked(store, bad, damaged)


def _shout(status: str) -> str:
    word, _, rest = status.partition(" ")
    return f"{word.upper()} {rest}".rstrip()


def _marked(store: SnapshotStore, bad: dict, damaged: tuple) -> int:
    if not bad and not damaged:
        return 0
    print(f"snapshots: {len(bad) + len(damaged)} file(s) missing, truncated or unreadable; run "
          f"`devinterp verify {store.root}` for the full check", file=sys.stderr)
    return 1


def run_verify(args: argparse.Namespace) -> int:
    if args.repair:
        print(SnapshotStore.repair(args.path))
    report = SnapshotStore.open(args.path).verify()
    print(report)
    if not report.ok:
        hint = "" if args.repair else f"; `devinterp verify --repair {args.path}` rebuilds the index from the sound files"
        print(f"verify: {len(report.problems)} problem(s) found{hint}", file=sys.stderr)
        return 1
    return 0
