"""``devinterp analyze PATH``: post-hoc analyses of a snapshot store or a folder of ``.ckpt`` files."""

from __future__ import annotations

import argparse
import sys

from devinterp.cli._common import check_accelerator, check_folder_arg
from devinterp.errors import PlanError, UsageError

_EPILOG = """\
--steps SPEC (comma-separated union): all | N | A:B | A: | :B | every:K | first:K | last:K | log:K
  e.g. --steps log:30,last:5   or   --steps 0,100:5000

Factories (package.module:name or path/to/file.py:name):
  --model  returns the nn.Module whose weights the snapshots hold (a LightningModule class works);
           called with the run's recorded hyper-parameters (those its signature accepts).
           Default: the class in run.json; for HuggingFace checkpoints, the model config.json builds.
  --data   returns a Dataset, DataLoader, tensor(s) or a LightningDataModule (training data, LLC).
           Default: the run's datamodule, else model.devinterp_data(), else model.train_dataloader().
  --loss   fn(model, batch) -> scalar mean loss. Default: model.devinterp_loss(batch), else the
           loss of model.training_step(batch, 0), else (a HuggingFace LM) next-token cross-entropy.
LLC settings: the --llc-* options; what they leave unset comes from model.devinterp_llc_settings()
  when the module defines it (the demo's InductionLM: its own chains, minibatch, localization and
  calibration settings), else from estimate_llc / calibrate's defaults. The first lines say which.

PATH: a snapshot store, a folder of Lightning .ckpt files, or a folder of HuggingFace checkpoints
(checkpoint-<step>/ as the HF Trainer writes them, step<step>/ or step-<step>/ save_pretrained folders).

Results: <store>/analysis/results.jsonl (a .ckpt folder: <folder>/devinterp-analysis/), resumable;
results.csv, results.json, transitions.json; TensorBoard events in the same folder, or DIR/analysis
with --logdir DIR. `devinterp report PATH` renders summary.png and report.md from them.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="post-hoc LLC / circuit / transition analysis of a store or checkpoint folder (resumable, distributed)",
        description="Analyse every selected snapshot of PATH (a snapshot store, a folder of Lightning .ckpt "
        "files or of HuggingFace checkpoints), save the results next to it (a second run skips what is done), detect transitions over the "
        "finished curves and write TensorBoard events. --devices/--num-nodes share the snapshots out over "
        "processes with Lightning Fabric. Without --llc/--circuits/--transitions: --llc --transitions.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH")
    what = p.add_argument_group("analyses")
    what.add_argument("--llc", action="store_true", help="estimate the local learning coefficient")
    what.add_argument("--circuits", action="store_true",
                      help="induction / previous-token head scores, ICL score, and weight-space circuits "
                           "(composition, OV copying, positional QK) where the heads can be located")
    what.add_argument("--transitions", action="store_true", help="detect transitions over the finished curves")
    what.add_argument("--analysis", action="append", default=[], metavar="package.module:factory",
                      help="a custom analysis: a factory returning an object with name, config(), compute() "
                      "(repeatable)")
    sel = p.add_argument_group("what and where")
    sel.add_argument("--steps", metavar="SPEC", default=None, help="snapshots to analyse (default all; see below)")
    sel.add_argument("--out", metavar="DIR", default=None, help="results folder (default next to the store)")
    sel.add_argument("--logdir", metavar="DIR", default=None, help="write TensorBoard events to DIR/analysis")
    sel.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    sel.add_argument("--force", action="store_true", help="recompute results that exist (new lines win)")
    sel.add_argument("--seed", type=int, default=0, help="base seed; per-snapshot seeds derive from (seed, step)")
    sel.add_argument("--no-progress", action="store_true", help="no progress bar")
    fac = p.add_argument_group("model, data and loss")
    fac.add_argument("--model", metavar="package.module:factory", default=None)
    fac.add_argument("--data", metavar="package.module:factory", default=None)
    fac.add_argument("--loss", metavar="package.module:fn", default=None)
    dist = p.add_argument_group("processes")
    dist.add_argument("--devices", default="1", help="processes per node: an integer or 'auto' (one per GPU)")
    dist.add_argument("--num-nodes", type=int, default=1)
    dist.add_argument("--accelerator", default="cpu", help="cpu (default), cuda, gpu, mps or auto")
    llc = p.add_argument_group("LLC options")
    llc.add_argument("--llc-chains", type=int, default=None, help="chains (default: calibration's, else 4)")
    llc.add_argument("--llc-draws", type=int, default=None,
                     help="draws per chain (default: calibration's, else 1000)")
    llc.add_argument("--llc-burnin", type=int, default=None,
                     help="burn-in steps per chain (default: calibration's, else 500)")
    llc.add_argument("--llc-step-size", default="auto",
                     help="SGLD step size, or 'auto' (default): calibrate once at the last selected snapshot "
                     "and reuse the calibration for every snapshot; explicit --llc-* values win over it")
    llc.add_argument("--llc-localization", type=float, default=None, help="gamma (default: calibration's, else 1)")
    llc.add_argument("--llc-nbeta", type=float, default=None, help="n*beta (default n/log n)")
    llc.add_argument("--llc-batch-size", type=int, default=None,
                     help="SGLD minibatch (default: the module's setting, else a DataLoader's, else 64; "
                     "a value >= n is full batch)")
    llc.add_argument("--llc-budget", type=int, default=None,
                     help="model evaluations (forward+backward passes of one chain on one minibatch) per "
                     "estimate; the calibration plans within it too (default 5000, the calibration's "
                     "from the module's settings if any; 0: no limit)")
    llc.add_argument("--llc-ignore-module-settings", action="store_true",
                     help="do not take defaults from the model's devinterp_llc_settings() (the demo's "
                     "InductionLM gives the demo's: 2 chains, minibatch 16, localization 100...)")
    llc.add_argument("--llc-sampler", default="sgld", help="sgld, rmsprop_sgld or sgnht")
    llc.add_argument("--llc-vectorize", default="false", choices=("false", "true", "auto"),
                     help="chains as model copies (false, default: reproducible), one vmap (true), or timed (auto)")
    cir = p.add_argument_group("circuit options")
    cir.add_argument("--vocab-size", type=int, default=None, help="default: the run's vocab_size hyper-parameter")
    cir.add_argument("--seq-len", type=int, default=None, help="default: the run's seq_len/n_ctx, at most 64")
    cir.add_argument("--num-sequences", type=int, default=32)
    cir.add_argument("--model-attr", default=None, help="score this submodule of the model instead of the model")
    tr = p.add_argument_group("transition options")
    tr.add_argument("--transition-metrics", default=None, metavar="TAG,TAG",
                    help="curves to search (default llc/mean, loss/train, induction/max, previous_token/max, icl_score)")
    p.set_defaults(func=run)


def _step_size(value: str):
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise PlanError(f"--llc-step-size must be a number or 'auto', got {value!r}") from None


def build_job(args: argparse.Namespace):
    """The :class:`~devinterp.posthoc.runner.Job` an ``analyze`` command line describes."""
    from devinterp.analyses.budget import DEFAULT_BUDGET
    from devinterp.factories import call_with_hparams, import_object
    from devinterp.posthoc.analyses import CircuitAnalysis, LLCAnalysis
    from devinterp.posthoc.runner import Job

    do_llc, do_circuits, do_transitions = args.llc, args.circuits, args.transitions
    if not (do_llc or do_circuits or do_transitions or args.analysis):
        do_llc = do_transitions = True
    analyses = []
    if do_llc:
        analyses.append(LLCAnalysis(
            num_chains=args.llc_chains, num_draws=args.llc_draws, num_burnin=args.llc_burnin,
            step_size=_step_size(args.llc_step_size), localization=args.llc_localization,
            nbeta=args.llc_nbeta, batch_size=args.llc_batch_size, sampler=args.llc_sampler,
            budget=DEFAULT_BUDGET if args.llc_budget is None else (args.llc_budget or None),
            # an explicit --llc-budget also bounds the calibration (over a module's own setting)
            calibrate_kwargs=None if args.llc_budget is None else {"budget": args.llc_budget or None},
            module_settings=not args.llc_ignore_module_settings,
            vectorize={"false": False, "true": True, "auto": "auto"}[args.llc_vectorize]))
    if do_circuits:
        analyses.append(CircuitAnalysis(vocab_size=args.vocab_size, seq_len=args.seq_len,
                                        num_sequences=args.num_sequences, model_attr=args.model_attr))
    for spec in args.analysis:
        factory = import_object(spec, what="--analysis")
        analyses.append(call_with_hparams(factory, {}, what=f"--analysis {spec}") if callable(factory) else factory)
    metrics = None
    if args.transition_metrics is not None:
        metrics = tuple(m.strip() for m in args.transition_metrics.split(",") if m.strip())
        if not metrics:
            raise UsageError("--transition-metrics is empty: give tags such as llc/mean,induction/max")
    return Job(path=args.path, analyses=tuple(analyses), steps=args.steps, out_dir=args.out, logdir=args.logdir,
               model=args.model, data=args.data, loss=args.loss, seed=args.seed, force=args.force,
               transitions=do_transitions, transition_metrics=metrics, progress=not args.no_progress,
               tensorboard=not args.no_tensorboard)


def _devices(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise PlanError(f"--devices must be a positive integer or 'auto', got {value!r}") from None
    return n


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_args(args: argparse.Namespace) -> None:
    """Everything about the command line that can be checked before any work starts."""
    if args.steps is not None and not args.steps.strip(" ,"):
        raise UsageError("--steps is empty: give a spec such as all, log:30 or 0,100:500 (or leave it out)")
    check_folder_arg(args.out, "--out")
    check_folder_arg(args.logdir, "--logdir")
    if args.num_nodes < 1:
        raise UsageError(f"--num-nodes must be >= 1, got {args.num_nodes}")
    devices = _devices(args.devices)
    if isinstance(devices, int) and devices < 1:
        raise UsageError(f"--devices must be a positive integer or 'auto', got {args.devices!r}")
    check_accelerator(args.accelerator, devices)


def run(args: argparse.Namespace) -> int:
    from devinterp.posthoc.distributed import launch

    check_args(args)
    job = build_job(args)
    summary = launch(job, devices=_devices(args.devices), num_nodes=args.num_nodes,
                     accelerator=args.accelerator, strategy="ddp", log=_log)
    if summary is None:  # not global rank zero
        return 0
    for t in summary.transitions:
        describe = getattr(t, "describe", None)
        print(describe() if callable(describe) else repr(t))
    print(f"analyze: {summary.computed} computed, {summary.failed} failed, {summary.plan.done} skipped (done), "
          f"{summary.seconds:.1f}s on {summary.world_size} process(es); results in {summary.out_dir}")
    if summary.noted:
        print(f"  {summary.noted} result(s) carry warnings: see 'notes' in {summary.out_dir}/results.jsonl",
              file=sys.stderr)
    for err in summary.errors[:10]:
        print(f"  failed: {err}", file=sys.stderr)
    if len(summary.errors) > 10:
        print(f"  ... and {len(summary.errors) - 10} more: see the error records in {summary.out_dir}/results.jsonl",
              file=sys.stderr)
    damaged = getattr(summary, "damaged", ())
    for item, message in damaged:
        print(f"  damaged: {item}: {message}", file=sys.stderr)
    unknown = getattr(summary, "unknown_metrics", ())
    if unknown:
        available = ", ".join(getattr(summary, "available_metrics", ())[:12]) or "none"
        print(f"analyze: --transition-metrics {','.join(unknown)}: no such curve in the results "
              f"(available: {available})", file=sys.stderr)
    if damaged:
        print(f"analyze: {len(damaged)} damaged item(s) left out; the others were analysed. "
              f"`devinterp verify {args.path}` lists the problems", file=sys.stderr)
    return 1 if (summary.failed or damaged or unknown) else 0
