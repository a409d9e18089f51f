"""``devinterp demo``: induction heads forming in a small transformer, tracked end to end."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small transformer with every devinterp callback and view it in TensorBoard",
        description=(
            "Train the reference 2-layer attention-only transformer on synthetic data until "
            "induction heads form, with snapshots, online LLC estimates, circuit scores and "
            "phase-transition detection; write DIR/summary.png, DIR/summary.json and TensorBoard "
            "logs under DIR/tensorboard. About 2 minutes on 2 CPU cores (--quick: about 1)."
        ),
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="output directory (default: runs/demo; a previous demo's own outputs there are replaced, "
                        "anything else is kept: a re-run over files the demo did not write needs --force)")
    p.add_argument("--force", action="store_true",
                   help="re-run over a previous demo whose folder holds other files (e.g. `devinterp analyze` "
                        "results): those are kept, moved to DIR/previous-<time>/ when inside the demo's folders")
    p.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None,
                     help="use the demo's hand-tuned LLC settings instead of calibrating the "
                          "sampler once, after the induction head has formed (see docs/demo.md)")
    cal.add_argument("--calibrate", dest="calibrate", action="store_true", default=None,
                     help="calibrate the LLC sampler once (the default; kept for compatibility)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads (default 1: fastest for this tiny model)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devinterp.demo import run_demo

    result = run_demo(args.out, quick=args.quick, seed=args.seed, calibrate=args.calibrate,
                        threads=args.threads, force=args.force,
                        progress=not args.no_progress)
    print()
    print("\n".join(result.summary_lines()))
    return 0
