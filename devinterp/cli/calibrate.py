"""``devinterp calibrate``: choose SGLD hyper-parameters for one snapshot and print the table."""

from __future__ import annotations

import argparse
import re
from typing import Any

from devinterp.errors import InvalidInputError

_PROBLEM = re.compile(r"^(dln|rrr):([0-9,\s]+):r=(\d+)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="choose the SGLD step size, burn-in and draws of the LLC from pilot chains",
        description="Run short pilot chains over a grid of step sizes at one snapshot and print "
        "the table (λ̂, burn-in, MALA acceptance, draws below L(w*), drift per step size), the "
        "choice and the reason. Input: a snapshot store PATH with --step and --model/--data/--loss "
        "factories (package.module:name), or --problem for a built-in ground-truth network, e.g. "
        "--problem dln:10,10,10:r=3 or --problem rrr:5,3,5:r=1.",
    )
    p.add_argument("path", metavar="PATH", nargs="?", help="snapshot store (local path or URL)")
    p.add_argument("--step", type=int, default=None, help="snapshot step (default: the latest)")
    p.add_argument("--model", help="model factory package.module:name (gets the run's hparams)")
    p.add_argument("--data", help="data factory package.module:name")
    p.add_argument("--loss", help="loss_fn(model, batch) package.module:name (default: the "
                   "module's devinterp_loss/training_step)")
    p.add_argument("--problem", help="built-in problem: dln:W0,W1,...:r=R or rrr:M,H,N:r=R")
    p.add_argument("--n", type=int, default=10_000, help="samples of a --problem (default 10000)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default 512)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="steps per pilot chain (default: planned from the budget, at most 400)")
    p.add_argument("--budget", type=int, default=5000,
                   help="model evaluations of the estimate this calibration configures, pilots "
                   "included (they get 40%%; default 5000; 0: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--grid-size", type=int, default=6, help="number of step sizes")
    p.add_argument("--localization", type=float, default=1.0, help="γ to start with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--png", help="save the λ̂-against-ε plot to this image file")
    p.add_argument("--logdir", help="write the plot and scalars to TensorBoard in this folder")
    p.add_argument("--save", help="write the calibration as JSON to this file (for reuse)")
    p.add_argument("--force", action="store_true", help="replace existing --png / --save files")
    p.set_defaults(func=run)


def _problem(spec: str, n: int, seed: int) -> tuple[Any, Any, Any, str]:
    from devinterp.analyses.theory import make_dln_problem, make_rrr_problem

    m = _PROBLEM.match(spec.replace(" ", ""))
    if not m:
        raise InvalidInputError(f"--problem {spec!r}: expected dln:W0,W1,...:r=R (e.g. "
                                "dln:10,10,10:r=3) or rrr:M,H,N:r=R (e.g. rrr:5,3,5:r=1)")
    kind, widths, r = m.group(1), [int(w) for w in m.group(2).split(",") if w], int(m.group(3))
    if kind == "dln":
        prob = make_dln_problem(widths, r, n, seed, noise_std=0.0)
    else:
        if len(widths) != 3:
            raise InvalidInputError(f"--problem {spec!r}: rrr takes M,H,N (three numbers)")
        prob = make_rrr_problem(widths[0], widths[1], widths[2], r, n, seed, noise_std=0.0)
    return prob.model, prob.data, prob.loss_fn, f"{prob.description}; exact λ = {prob.llc:g}"


def _from_store(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    from devinterp import factories
    from devinterp.store import SnapshotStore

    if not args.model or not args.data:
        raise InvalidInputError("calibrating a snapshot store needs --model and --data "
                                "factories (package.module:name); or use --problem")
    store = SnapshotStore.open(args.path)
    hparams = store.run_info().get("hparams") or {}
    model = factories.build_model(args.model, hparams, what="--model")
    snap = store.load_into(model, args.step)
    data = factories.data_from_object(
        factories.call_with_hparams(factories.import_object(args.data, what="--data"), hparams,
                                    what="--data"), what="--data")
    if args.loss:
        loss_fn = factories.import_object(args.loss, what="--loss")
    else:
        loss_fn = factories.loss_from_module(model)
        if loss_fn is None:
            raise InvalidInputError("the model defines neither devinterp_loss nor training_step: "
                                    "pass --loss package.module:loss_fn")
    model.eval()
    return model, data, loss_fn, f"{args.path} at step {snap.step}"


def run(args: argparse.Namespace) -> int:
    from devinterp.analyses.calibration import calibrate
    from devinterp.cli._common import check_device, check_file_arg, check_folder_arg

    if bool(args.problem) == bool(args.path):
        raise InvalidInputError("give either a snapshot store PATH or --problem (not both)")
    check_device(args.device)
    check_folder_arg(args.logdir, "--logdir")
    check_file_arg(args.png, "--png", force=args.force)
    check_file_arg(args.save, "--save", force=args.force)
    if args.problem:
        model, data, loss_fn, what = _problem(args.problem, args.n, args.seed)
    else:
        model, data, loss_fn, what = _from_store(args)
    import sys

    cal = calibrate(model, data, loss_fn, num_steps=args.num_steps, grid_size=args.grid_size,
                    localization=args.localization, batch_size=args.batch_size, seed=args.seed,
                    device=args.device, budget=args.budget or None,
                    progress=False if args.no_progress else None)
    print(f"calibration of {what} ({cal.seconds:.1f} s, {cal.cost:,} model evaluations)")
    print(cal)
    if not cal.ok:
        print("devinterp calibrate: FALLBACK (ok: false): " + "; ".join(cal.warnings),
              file=sys.stderr, flush=True)
    if args.png:
        cal.plot(args.png)
        print(f"plot: {args.png}")
    if args.logdir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.logdir) as writer:
            cal.log_tensorboard(writer, step=args.step or 0)
        print(f"tensorboard: {args.logdir}")
    if args.save:
        cal.save(args.save)
        print(f"saved: {args.save} (reuse: estimate_llc(..., calibration=Calibration.load(path)))")
    return 0
