"""The Python entry points: :func:`analyze`, :func:`load_results`, :func:`write_report`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devinterp.errors import StoreNotFoundError
from devinterp.posthoc import outputs
from devinterp.posthoc.results import RESULTS_FILE, ResultsFile, curves_from_records
from devinterp.posthoc.runner import Job, RunSummary, current_records, default_out_dir, store_curves

__all__ = ["analyze", "load_results", "write_report", "resolve_output"]


def analyze(path: str | os.PathLike, analyses: Sequence[Any] = (), *, steps: str | None = None,
            out_dir: str | None = None, logdir: str | None = None, model: Any = None, data: Any = None,
            loss: Any = None, seed: int = 0, force: bool = False, transitions: bool = True,
            transition_metrics: Sequence[str] | None = None, devices: int | str = 1, num_nodes: int = 1,
            accelerator: str = "cpu", strategy: str = "ddp_spawn", progress: bool = False,
            log: Callable[[str], None] | None = None) -> RunSummary | None:
    """Analyse the snapshots at ``path`` (a snapshot store or a folder of ``.ckpt`` files).

    Args:
        path: The store or checkpoint folder.
        analyses: Per-snapshot analyses, e.g. ``[LLCAnalysis(), CircuitAnalysis(vocab_size=64)]``.
        steps: Which snapshots (``"log:30"``, ``"100:5000"``... see :func:`parse_steps`).
        out_dir: Results folder (default ``<store>/analysis`` or ``<folder>/devinterp-analysis``).
        logdir: TensorBoard events go to ``<logdir>/analysis`` (default: into ``out_dir``).
        model: Model factory: ``"package.module:name"`` or a callable (called with the run's
            hyper-parameters). Default: the class recorded in the run file.
        data: LLC data: a factory (spec or callable), or the data itself (Dataset, DataLoader,
            tuple of tensors). Default: the recorded datamodule or the module's ``train_dataloader``.
        loss: ``loss_fn(model, batch) -> scalar`` (spec or callable). Default: the module's
            ``devinterp_loss(batch)`` or ``training_step(batch, 0)``.
        seed: Base seed (per-snapshot seeds derive from it and the step).
        force: Recompute existing results.
        transitions: Detect transitions over the finished curves.
        transition_metrics: Curves to search for transitions.
        devices, num_nodes, accelerator: Processes per node, nodes, device kind (Lightning Fabric).
        strategy: ``"ddp_spawn"`` (default here: works from any Python process) or ``"ddp"``.
        progress: Show a progress bar on stderr.
        log: Status lines of rank zero (e.g. ``print``).

    Returns:
        A :class:`RunSummary` (None on ranks other than zero when launched with ``"ddp"``).
    """
    from devinterp.posthoc.distributed import launch

    job = Job(path=os.fspath(path), analyses=tuple(analyses), steps=steps, out_dir=out_dir, logdir=logdir,
              model=model, data=data, loss=loss, seed=seed, force=force, transitions=transitions,
              transition_metrics=tuple(transition_metrics) if transition_metrics else None,
              progress=progress)
    return launch(job, devices=devices, num_nodes=num_nodes, accelerator=accelerator, strategy=strategy, log=log)


def resolve_output(path: str | os.PathLike) -> tuple[Path, Any]:
    """``(results folder, store or None)`` for a store, a ``.ckpt`` folder or a results folder."""
    p = Path(path)
    if (p / RESULTS_FILE).exists() and not (p / "index.jsonl").exists():
        return p, None
    from devinterp.posthoc.runner import open_store

    try:
        store = open_store(os.fspath(path))
    except StoreNotFoundError as exc:
        raise StoreNotFoundError(f"{exc}; or pass the folder that holds {RESULTS_FILE}") from exc
    return Path(default_out_dir(store)), store


def load_results(path: str | os.PathLike) -> tuple[dict, list | None, Path]:
    """Curves (latest configuration of each analysis, plus ``loss/train`` from the store), the saved
    transitions (None if never computed) and the results folder.

    Raises:
        StoreNotFoundError: ``path`` is neither a store, a checkpoint folder nor a results folder.
    """
    out_dir, store = resolve_output(path)
    records = ResultsFile(out_dir / RESULTS_FILE).read()
    latest: dict[str, str] = {}
    for rec in records:
        latest[rec.analysis] = rec.config
    curves = dict(store_curves(store)) if store is not None else {}
    curves.update(curves_from_records(current_records(records, set(latest.items()))))
    return outputs.with_band(curves), outputs.read_transitions(out_dir), out_dir


def write_report(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 title: str | None = None) -> dict[str, Path]:
    """Render ``summary.png``, ``report.md`` and ``summary.json`` from saved results.

    Transitions come from ``transitions.json`` (written by ``devinterp analyze``); when it is
    missing they are detected now.

    Returns:
        ``{"png": ..., "markdown": ..., "json": ...}``.
    """
    from devinterp.report import markdown_report, save_summary_png, write_summary_json

    curves, transitions, out_dir = load_results(path)
    if transitions is None:
        try:
            transitions = outputs.run_transitions(curves)
        except ImportError:  # transition detection not installed
            transitions = []
    target = Path(out) if out is not None else out_dir
    target.mkdir(parents=True, exist_ok=True)
    title = title or f"devinterp report: {Path(os.fspath(path)).resolve()}"
    png = save_summary_png(target / "summary.png", curves, transitions, title=None)
    md = target / "report.md"
    md.write_text(markdown_report(curves, transitions, title=title, figure="summary.png"))
    js = write_summary_json(target / "summary.json", curves, transitions)
    return {"png": png, "markdown": md, "json": js}
