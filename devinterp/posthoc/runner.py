"""The post-hoc run: plan on rank zero, share the snapshots out, gather and write on rank zero.

This module has no Lightning import: it talks to the processes through a small :class:`Comm`
(rank, world size, device, broadcast, all-gather of objects), which
:mod:`devinterp.posthoc.distributed` implements with Lightning Fabric, and :class:`LocalComm` for
one process.

Rounds: the pending snapshots (sorted by step) are dealt round-robin; in round ``k`` rank ``r``
computes item ``k·W + r``, then every rank's records are all-gathered and rank zero appends them
to ``results.jsonl`` (whole lines, fsynced). An interruption loses at most the round in flight.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from devinterp.errors import (
    ChainDivergedError,
    CorruptSnapshotError,
    DamagedItemsError,
    DevinterpError,
    EmptyStoreError,
    FactoryError,
    OutputExistsError,
    PlanError,
    StateDictMismatchError,
    StoreNotFoundError,
    exit_status,
)
from devinterp.factories import (
    as_data,
    build_model,
    call_with_hparams,
    data_from_object,
    import_object,
    loss_from_module,
)
from devinterp.posthoc import outputs
from devinterp.posthoc.analyses import AnalysisContext, config_hash, derive_seed
from devinterp.posthoc.plan import Plan, PlanItem, make_plan, parse_steps
from devinterp.posthoc.results import RESULTS_FILE, ResultRecord, ResultsFile, curves_from_records
from devinterp.store import SnapshotStore, WriterLock

__all__ = ["Job", "RunSummary", "Comm", "LocalComm", "run_job", "default_out_dir"]


class Comm(Protocol):
    """The collective operations the runner needs (rank zero is the writer)."""

    global_rank: int
    world_size: int
    device: torch.device

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...


class LocalComm:
    """One process, no collectives."""

    global_rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


@dataclass(frozen=True)
class Job:
    """Everything a post-hoc run needs; picklable (factories as specs or module-level callables).

    Attributes:
        path: A snapshot store or a folder of Lightning ``.ckpt`` files.
        analyses: Per-snapshot analyses (objects with ``name``, ``config()``, ``compute()``).
        steps: ``--steps`` spec (see :mod:`devinterp.posthoc.plan`); None: all snapshots.
        out_dir: Where ``results.jsonl`` and the tables go; None: ``<store>/analysis`` (store) or
            ``<folder>/devinterp-analysis`` (checkpoint folder).
        logdir: TensorBoard events go to ``<logdir>/analysis``; None: into ``out_dir``.
        model: Model factory (spec ``package.module:name`` or callable); None: the run file's class.
        data: LLC data factory; None: the run's datamodule, else the module's ``train_dataloader``.
        loss: ``loss_fn(model, batch)`` (spec or callable); None: the module's ``devinterp_loss`` /
            ``training_step``.
        seed: Base seed; each snapshot's analyses use seeds derived from ``(seed, step, name)``.
        force: Recompute results that exist (the new lines win).
        transitions: Run transition detection over the finished curves.
        transition_metrics: Curves to search (default :data:`outputs.DEFAULT_TRANSITION_METRICS`).
        progress: Show a progress bar (rank zero, stderr).
        tensorboard: Write TensorBoard events.
    """

    path: str
    analyses: tuple = ()
    steps: str | None = None
    out_dir: str | None = None
    logdir: str | None = None
    model: Any = None
    data: Any = None
    loss: Any = None
    seed: int = 0
    force: bool = False
    transitions: bool = True
    transition_metrics: tuple[str, ...] | None = None
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        names = [a.name for a in self.analyses]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PlanError(f"two analyses share the name {dup}; give each a distinct name")
        for a in self.analyses:
            for attr in ("name", "config", "compute"):
                if not hasattr(a, attr):
                    raise PlanError(f"{a!r} is not an analysis: it lacks {attr!r} (see devinterp.posthoc.Analysis)")


@dataclass(frozen=True)
class RunSummary:
    """What a run did.

    Attributes:
        plan: The plan (selected steps, keys, pending work).
        computed: Results computed and saved by this run.
        failed: Failed computations (saved as error records, retried next time).
        seconds: Wall time of the compute loop.
        out_dir: Folder of ``results.jsonl`` and the tables.
        tensorboard_dir: Folder of the TensorBoard events (None if not written).
        transitions: Transitions found over the finished curves.
        world_size: Number of processes.
        errors: ``"step S analysis: message"`` of the failures (damaged snapshots aside).
        noted: Results of this run that carry warnings (``notes`` in their line).
        damaged: ``(item, message)`` of each damaged item: a snapshot whose file is missing,
            truncated or corrupt (``"step S (file)"``; its analyses are saved as failures and
            retried next run) or a ``.ckpt`` file that cannot be read. The rest is analysed.
        unknown_metrics: ``transition_metrics`` that name no curve of the results.
        available_metrics: The curves there are (when some were unknown).
    """

    plan: Plan
    computed: int
    failed: int
    seconds: float
    out_dir: str
    tensorboard_dir: str | None
    transitions: tuple = ()
    world_size: int = 1
    errors: tuple[str, ...] = ()
    noted: int = 0
    damaged: tuple[tuple[str, str], ...] = ()
    unknown_metrics: tuple[str, ...] = ()
    available_metrics: tuple[str, ...] = ()

    @property
    def snapshots_per_second(self) -> float:
        n = len(self.plan.pending)
        return n / self.seconds if self.seconds > 0 else math.nan


def default_out_dir(store: SnapshotStore) -> str:
    """``<store>/analysis`` for a snapshot store, ``<folder>/devinterp-analysis`` for ``.ckpt`` files."""
    root = store.root
    if "://" in root and not root.startswith("file://"):
        raise PlanError(
            f"{root} is not a local folder; pass an output folder for the results (--out DIR)"
        )
    ckpt = store.run_info().get("format") in ("lightning-checkpoints", "hf-checkpoints")
    return os.path.join(root, "devinterp-analysis" if ckpt else "analysis")


def open_store(path: str) -> SnapshotStore:
    """Open a store or checkpoint folder, with the fix in the message when there is nothing to analyse."""
    try:
        store = SnapshotStore.open(path)
    except StoreNotFoundError as exc:
        raise StoreNotFoundError(
            f"{exc}. Point it at the folder SnapshotCallback wrote (default <log_dir>/snapshots, the one "
            f"holding index.jsonl) or at ModelCheckpoint's dirpath (the one holding the .ckpt files)"
        ) from exc
    if len(store) == 0:
        raise EmptyStoreError(
            f"{store.root} holds no snapshot yet: nothing to analyse (check that training reached a "
            f"scheduled step, or run `devinterp snapshots {path}`)"
        )
    return store


# ---------------------------------------------------------------------------------------------
# building model, data and loss


def _model_factory(job: Job, info: Mapping[str, Any]) -> tuple[Any, str]:
    if job.model is not None:
        if isinstance(job.model, str):
            return import_object(job.model, what="--model"), job.model
        return job.model, getattr(job.model, "__qualname__", repr(job.model))
    cls = info.get("model_class")
    if not cls:
        what = "Lightning checkpoints do not record it" if info.get("format") == "lightning-checkpoints" \
            else "the run file records none"
        raise FactoryError(
            f"cannot rebuild the model: {what}. Pass --model package.module:YourLightningModule (or a "
            f"function returning the nn.Module; it is called with the run's hyper-parameters), e.g. "
            f"--model mypkg.models:make_model"
        )
    if cls.startswith("__main__:"):
        raise FactoryError(
            f"the run file records the model class as {cls!r}: it was defined in the training script "
            f"itself, which cannot be imported. Pass --model script_module:{cls.split(':', 1)[1]} "
            f"(running from the script's folder)"
        )
    return import_object(cls, what="model class recorded in run.json"), cls


def _make_model(job: Job, info: Mapping[str, Any]) -> nn.Module:
    factory, label = _model_factory(job, info)
    return build_model(factory, info.get("hparams") or {}, what=f"model factory {label}")


def _overrides_train_dataloader(model: nn.Module) -> bool:
    fn = getattr(type(model), "train_dataloader", None)
    return fn is not None and not fn.__qualname__.startswith(("DataHooks.", "LightningModule."))


def _make_data(job: Job, info: Mapping[str, Any], model: nn.Module) -> Any:
    hparams = info.get("hparams") or {}
    if job.data is not None and not isinstance(job.data, str) and not callable(job.data):
        return data_from_object(job.data, what="data")
    if job.data is not None:
        label = job.data if isinstance(job.data, str) else getattr(job.data, "__qualname__", repr(job.data))
        factory = import_object(job.data, what="--data") if isinstance(job.data, str) else job.data
        obj = call_with_hparams(factory, hparams, what=f"data factory {label}")
        return data_from_object(obj, what=f"data factory {label}")
    dm_cls = info.get("datamodule_class")
    if dm_cls:
        factory = import_object(dm_cls, what="datamodule class recorded in run.json")
        obj = call_with_hparams(factory, info.get("datamodule_hparams") or {}, what=f"datamodule {dm_cls}")
        return data_from_object(obj, what=f"datamodule {dm_cls}")
    hook = getattr(model, "devinterp_data", None)
    if callable(hook):  # the module names its own LLC data (e.g. devinterp.demo.InductionLM)
        try:
            obj = hook()
        except Exception as exc:
            raise FactoryError(f"{type(model).__name__}.devinterp_data() failed ({type(exc).__name__}: {exc}); "
                               f"pass --data package.module:factory") from exc
        return data_from_object(obj, what=f"{type(model).__name__}.devinterp_data()")
    if _overrides_train_dataloader(model):
        try:
            loader = model.train_dataloader()
        except Exception as exc:
            raise FactoryError(f"{type(model).__name__}.train_dataloader() failed ({type(exc).__name__}: {exc}); "
                               f"pass --data package.module:factory") from exc
        return as_data(loader, what=f"{type(model).__name__}.train_dataloader()")
    raise FactoryError(
        f"the LLC needs the training data: the run records no datamodule and {type(model).__name__} "
        f"defines no train_dataloader(). Pass --data package.module:factory returning a Dataset, a "
        f"DataLoader or a tuple of tensors"
    )


def _make_loss(job: Job, model: nn.Module) -> Callable:
    if job.loss is not None:
        fn = import_object(job.loss, what="--loss") if isinstance(job.loss, str) else job.loss
        if not callable(fn):
            raise FactoryError(f"--loss {job.loss!r} is not callable; it must be loss_fn(model, batch) -> scalar")
        return fn
    fn = loss_from_module(model)
    if fn is None and _returns_logits(model):
        from devinterp.analyses.losses import lm_loss

        return lm_loss  # a language model (e.g. HuggingFace): next-token cross-entropy
    if fn is None:
        raise FactoryError(
            f"no loss function: {type(model).__name__} defines neither devinterp_loss(batch) nor "
            f"training_step(batch, batch_idx). Pass --loss package.module:fn with fn(model, batch) -> scalar loss"
        )
    return fn


def _returns_logits(model: nn.Module) -> bool:
    """A HuggingFace causal LM (its config names a vocabulary): ``lm_loss`` fits it."""
    config = getattr(model, "config", None)
    return config is not None and isinstance(getattr(config, "vocab_size", None), int)


def _first_batch(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data[: min(len(data), 4)]
    if isinstance(data, tuple):
        return tuple(t[: min(len(t), 4)] for t in data)
    if isinstance(data, torch.utils.data.DataLoader):
        return next(iter(data))
    if isinstance(data, torch.utils.data.Dataset):
        from torch.utils.data import default_collate

        return default_collate([data[i] for i in range(min(len(data), 4))])  # type: ignore[arg-type]
    return None


def _check_loss(loss_fn: Callable, model: nn.Module, data: Any, device: torch.device) -> None:
    batch = _first_batch(data)
    if batch is None:
        return
    from torch.utils._pytree import tree_map

    batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
    name = getattr(loss_fn, "__qualname__", repr(loss_fn))
    try:
        with torch.no_grad():
            loss = loss_fn(model, batch)
    except FactoryError:
        raise
    except Exception as exc:
        raise FactoryError(
            f"the loss {name}(model, batch) failed on the first batch of the data "
            f"({type(exc).__name__}: {exc}); check that --data yields the batches the loss expects"
        ) from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise FactoryError(f"the loss {name}(model, batch) returned {type(loss).__name__}, not a scalar tensor")


def _load(store: SnapshotStore, model: nn.Module, step: int, label: str) -> Any:
    try:
        return store.load_into(model, step)
    except StateDictMismatchError as exc:
        raise StateDictMismatchError(
            f"{exc}. The model built by {label} does not match the weights: pass --model with the "
            f"factory that built the trained network (for a .ckpt folder: the LightningModule class)"
        ) from exc


def _load_first_sound(store: SnapshotStore, model: nn.Module, steps: Sequence[int], label: str,
                      damaged: dict[int, str] | None) -> int:
    """Load the first of ``steps`` whose file is sound; damaged ones go to ``damaged`` (step -> message)."""
    for step in steps:
        if damaged is not None and step in damaged:
            continue
        try:
            _load(store, model, step, label)
            return step
        except CorruptSnapshotError as exc:
            if damaged is None:
                raise
            damaged[step] = str(exc)
    raise DamagedItemsError(
        f"every selected snapshot is damaged ({len(damaged or {})}), e.g. "
        + "; ".join(list((damaged or {}).values())[:2])
        + f". `devinterp verify {store.root}` lists the problems",
        damaged=tuple((f"step {s}", m) for s, m in (damaged or {}).items()))


@dataclass
class _Setup:
    model: nn.Module
    data: Any = None
    loss_fn: Any = None
    label: str = ""


def _build(job: Job, store: SnapshotStore, info: Mapping[str, Any], need_data: bool,
           device: torch.device, check_step: int | Sequence[int] | None,
           damaged: dict[int, str] | None = None) -> _Setup:
    model = _make_model(job, info)
    label = job.model if isinstance(job.model, str) else (info.get("model_class") or "--model")
    model.to(device)
    if check_step is not None:
        _load_first_sound(store, model, [check_step] if isinstance(check_step, int) else check_step,
                          str(label), damaged)
    data = loss_fn = None
    if need_data:
        data = _make_data(job, info, model)
        loss_fn = _make_loss(job, model)
        _check_loss(loss_fn, model, data, device)
    return _Setup(model, data, loss_fn, str(label))


# ---------------------------------------------------------------------------------------------
# the run


def _current_keys(keys: Sequence[tuple[str, str]], records: Sequence[ResultRecord]) -> set[tuple[str, str]]:
    """This run's keys, plus the latest configuration of every other analysis in the file."""
    current = set(keys)
    names = {n for n, _ in keys}
    for rec in records:  # file order: the last one of a name wins
        if rec.analysis not in names:
            current = {(n, h) for n, h in current if n != rec.analysis} | {(rec.analysis, rec.config)}
    return current


def current_records(records: Sequence[ResultRecord], keys: set[tuple[str, str]]) -> list[ResultRecord]:
    """The last successful record of each (analysis, step) among ``keys``, in file order."""
    latest: dict[tuple[str, int, str], ResultRecord] = {}
    for rec in records:
        if rec.ok and (rec.analysis, rec.config) in keys:
            latest[rec.key] = rec
    return list(latest.values())


def store_curves(store: SnapshotStore) -> dict:
    """``loss/train`` from the snapshots' index records (the training loss when each was taken)."""
    import numpy as np

    pts = []
    for s in store.steps():
        v = store.meta(s).get("train_loss")
        if isinstance(v, (int, float)) and math.isfinite(v):
            pts.append((s, float(v)))
    if not pts:
        return {}
    return {"loss/train": (np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts]))}


def _compute_item(item: PlanItem, store: SnapshotStore, setup: _Setup, analyses: Mapping[str, Any],
                  hashes: Mapping[str, str], job: Job, out_dir: str, device: torch.device, rank: int,
                  hparams: Mapping[str, Any]) -> tuple[list[ResultRecord], str | None, BaseException | None]:
    """Records for one snapshot, and a fatal error (a problem that every snapshot will hit)."""
    records: list[ResultRecord] = []
    try:
        snap = _load(store, setup.model, item.step, setup.label)
    except CorruptSnapshotError as exc:  # this snapshot's file only: every analysis of it fails
        for name in item.analyses:
            records.append(ResultRecord(name, item.step, hashes[name], error=f"{type(exc).__name__}: {exc}",
                                        meta={"rank": rank}))
        return records, None, None
    except Exception as exc:
        return records, f"step {item.step}: {type(exc).__name__}: {exc}", exc
    for name in item.analyses:
        analysis = analyses[name]
        ctx = AnalysisContext(step=item.step, seed=job.seed, step_seed=derive_seed(job.seed, item.step, name),
                              device=device, data=setup.data, loss_fn=setup.loss_fn, hparams=hparams,
                              workdir=out_dir)
        meta = {"seed": ctx.step_seed, "rank": rank, "params": analysis.config()}
        t0 = time.perf_counter()
        try:
            scalars = analysis.compute(setup.model, snap, ctx)
        except ChainDivergedError as exc:  # this snapshot only: saved as a failure, retried next run
            records.append(ResultRecord(name, item.step, hashes[name], seconds=time.perf_counter() - t0,
                                        error=f"{type(exc).__name__}: {exc}", meta=meta))
            continue
        except DevinterpError as exc:  # bad input: every snapshot would hit it, stop
            return records, f"step {item.step} {name}: {type(exc).__name__}: {exc}", exc
        except (RuntimeError, FloatingPointError, ArithmeticError) as exc:  # numerical trouble here
            records.append(ResultRecord(name, item.step, hashes[name], seconds=time.perf_counter() - t0,
                                        error=f"{type(exc).__name__}: {exc}", meta=meta))
            continue
        except Exception as exc:
            tb = traceback.format_exc(limit=-3)
            return records, f"step {item.step} {name}: {type(exc).__name__}: {exc}\n{tb}", exc
        if ctx.notes:
            meta["notes"] = [str(n) for n in ctx.notes]
        records.append(ResultRecord(name, item.step, hashes[name], scalars=dict(scalars),
                                    seconds=time.perf_counter() - t0, meta=meta))
    return records, None, None


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="snapshot", desc="devinterp analyze", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def run_job(job: Job, comm: Comm | None = None, *, log: Callable[[str], None] | None = None) -> RunSummary:
    """Run a post-hoc job on this process (call it on every rank with the same job).

    Raises:
        StoreNotFoundError / EmptyStoreError: Nothing to analyse at ``job.path``.
        FactoryError: A model / data / loss factory does not import, fails or returns nothing usable.
        StateDictMismatchError: The model does not fit the weights.
        PlanError: Bad ``--steps`` or output folder.
        KeyboardInterrupt: Interrupted; everything finished before is saved.
    """
    comm = comm or LocalComm()
    rank = comm.global_rank
    say = log if (log is not None and rank == 0) else (lambda _msg: None)

    # ---- setup on rank zero: everything that can fail on bad input, before any work ----------
    setup_state: dict[str, Any] = {}
    error: BaseException | None = None
    damaged_steps: dict[int, str] = {}
    out_lock: WriterLock | None = None
    store: SnapshotStore | None = None
    setup: _Setup | None = None
    if rank == 0:
        try:
            store = open_store(job.path)
            out_dir = job.out_dir or default_out_dir(store)
            check_out_dir(out_dir)
            out_lock = _lock_out_dir(out_dir)
            info = store.run_info()
            steps = parse_steps(job.steps, store.steps())
            results = ResultsFile(Path(out_dir) / RESULTS_FILE)
            records = results.read()
            hashes = {a.name: config_hash(a.name, a.config()) for a in job.analyses}
            plan = make_plan(steps, list(hashes.items()), {r.key for r in records if r.ok}, force=job.force)
            say(f"{store.root}: {plan.describe()}")  # before any one-time work (e.g. calibration)
            pending_names = {n for item in plan.pending for n in item.analyses}
            need_data = any(getattr(a, "needs_data", False) for a in job.analyses if a.name in pending_names)
            analyses = list(job.analyses)
            if plan.pending:
                # a damaged snapshot is skipped here (and reported at the end), never fatal
                pending_steps = [item.step for item in plan.pending]
                setup = _build(job, store, info, need_data, comm.device, pending_steps, damaged_steps)
                # prepare (e.g. calibrate) at the last sound selected snapshot, once, here
                last = _load_first_sound(store, setup.model, pending_steps[::-1], setup.label, damaged_steps)
                ctx = AnalysisContext(step=last, seed=job.seed,
                                      step_seed=derive_seed(job.seed, last, "prepare"),
                                      device=comm.device, data=setup.data, loss_fn=setup.loss_fn,
                                      hparams=info.get("hparams") or {}, workdir=out_dir,
                                      progress=None if job.progress else False)
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                analyses = [a.prepare(setup.model, ctx) if a.name in pending_names and hasattr(a, "prepare") else a
                            for a in job.analyses]
            setup_state = dict(out_dir=out_dir, plan=plan, hashes=hashes, analyses=analyses, need_data=need_data)
        except BaseException as exc:  # sent to the other ranks so that nobody waits forever
            error = exc
            if out_lock is not None:
                out_lock.release()
    shared = comm.broadcast((setup_state, _picklable_error(error)) if rank == 0 else None, src=0)
    if error is not None:
        raise error
    setup_state, remote_error = shared
    if remote_error is not None:
        raise _RankZeroFailed(*remote_error)
    try:
        return _run_rounds(job, comm, store, setup, setup_state, damaged_steps, say)
    finally:
        if out_lock is not None:
            out_lock.release()


def _run_rounds(job: Job, comm: Comm, store: SnapshotStore | None, setup: _Setup | None,
                setup_state: dict[str, Any], damaged_steps: dict[int, str],
                say: Callable[[str], None]) -> RunSummary:
    rank, world = comm.global_rank, comm.world_size
    out_dir: str = setup_state["out_dir"]
    plan: Plan = setup_state["plan"]
    hashes: dict[str, str] = setup_state["hashes"]
    analyses = {a.name: a for a in setup_state["analyses"]}
    local_error: BaseException | None = None
    if rank != 0:
        try:
            store = open_store(job.path)
            if plan.pending:
                setup = _build(job, store, store.run_info(), setup_state["need_data"], comm.device, None)
        except Exception as exc:  # e.g. a node that cannot import the model: everyone stops
            local_error = exc
    if world > 1:
        gathered = comm.all_gather_object(_picklable_error(local_error))
        failures = [(r, e) for r, e in enumerate(gathered) if e]
        if failures:  # every rank ends with the same one-line error and exit status
            first_rank, (name, message, status) = failures[0]
            raise _RankFailed(f"process {first_rank} of {world} could not start: {name}: {message}",
                              exit_status=status)
    if local_error is not None:
        raise local_error
    assert store is not None
    info = store.run_info()
    hparams = info.get("hparams") or {}

    # ---- rank zero: outputs ---------------------------------------------------------------------
    tb = None
    results = ResultsFile(Path(out_dir) / RESULTS_FILE)
    base_curves = store_curves(store)
    tb_dir = None
    if rank == 0:
        records = results.read()
        keys = _current_keys(list(hashes.items()), records)
        pending_keys = {(n, item.step, hashes[n]) for item in plan.pending for n in item.analyses}
        if job.tensorboard:
            tb_dir = str(Path(job.logdir) / "analysis") if job.logdir else out_dir
            tb = outputs.TensorBoardOut(tb_dir, store.root)
            kept = [r for r in current_records(records, keys) if r.key not in pending_keys]
            tb.curves(outputs.with_band({**base_curves, **curves_from_records(kept)}))
            tb.flush()

    # ---- the rounds -------------------------------------------------------------------------------
    items = list(plan.pending)
    rounds = math.ceil(len(items) / world) if items else 0
    bar = _progress(len(items), job.progress) if rank == 0 else None
    computed = failed = noted = 0
    errors: list[str] = []
    fatal: str | None = None
    t_start = time.perf_counter()
    local_exc: BaseException | None = None
    try:
        for k in range(rounds):
            idx = k * world + rank
            mine: tuple[list[ResultRecord], str | None, int] = ([], None, 0)
            if idx < len(items):
                recs, msg, local_exc = _compute_item(items[idx], store, setup, analyses, hashes, job,
                                                     out_dir, comm.device, rank, hparams)
                mine = (recs, msg, exit_status(local_exc) if local_exc is not None else 0)
            gathered = comm.all_gather_object(mine) if world > 1 else [mine]
            batch = [rec for recs, _, _ in gathered for rec in recs]
            fatal, fatal_status = next(((msg, st) for _, msg, st in gathered if msg), (None, 2))
            if rank == 0:
                results.append(batch)
                for rec in batch:
                    if rec.ok:
                        computed += 1
                        noted += bool(rec.meta.get("notes"))
                        if tb is not None:
                            tb.scalars(rec.step, rec.scalars)
                    else:
                        failed += 1
                        if rec.error.startswith(f"{CorruptSnapshotError.__name__}:"):  # a damaged file
                            damaged_steps.setdefault(rec.step, rec.error.split(": ", 1)[1])
                        else:
                            errors.append(f"step {rec.step} {rec.analysis}: {rec.error}")
                if tb is not None:
                    tb.flush()
                if bar is not None:
                    last = next((r for r in reversed(batch) if r.ok and "llc/mean" in r.scalars), None)
                    if last is not None:
                        bar.set_postfix(step=last.step, llc=f"{last.scalars['llc/mean']:.4g}", refresh=False)
                    bar.update(sum(1 for i in range(world) if k * world + i < len(items)))
            if fatal:
                break
    except BaseException:
        if tb is not None:
            tb.close()
        raise
    finally:
        seconds = time.perf_counter() - t_start
        if bar is not None:
            bar.close()
    if fatal:
        if tb is not None:
            tb.close()
        if local_exc is not None and world == 1:
            raise local_exc
        # every rank ends with the same one-line error and exit status
        raise _RankFailed(f"{fatal.splitlines()[0]} (results finished before this are saved)",
                          exit_status=fatal_status)

    # ---- rank zero: transitions, tables ------------------------------------------------------
    transitions: list = []
    unknown: tuple[str, ...] = ()
    curves: dict = {}
    if rank == 0:
        records = results.read()
        keys = _current_keys(list(hashes.items()), records)
        curves = {**base_curves, **curves_from_records(current_records(records, keys))}
        if job.transitions:
            transitions = outputs.run_transitions(curves, job.transition_metrics)
            outputs.write_transitions(out_dir, transitions)
            unknown = tuple(m for m in job.transition_metrics or () if m not in curves)
        if curves:
            outputs.write_tables(out_dir, outputs.with_band(curves))
        if tb is not None:
            tb.transitions(transitions)
            tb.close()
        say(f"{computed} computed, {failed} failed, {plan.done} already done; results in {out_dir}"
            + (f"; {len(transitions)} transition(s)" if job.transitions else ""))
    comm.barrier()
    damaged = tuple((f"step {s}", m) for s, m in sorted(damaged_steps.items()))
    damaged += tuple((p.file, p.message) for p in store.damaged())
    if rank == 0 and damaged:
        say(f"{len(damaged)} damaged item(s) left out: " + "; ".join(f"{i}: {m}" for i, m in damaged[:5]))
    return RunSummary(plan=plan, computed=computed, failed=failed, seconds=seconds, out_dir=out_dir,
                      tensorboard_dir=tb_dir, transitions=tuple(transitions), world_size=world,
                      errors=tuple(errors), noted=noted, damaged=damaged, unknown_metrics=unknown,
                      available_metrics=tuple(sorted(curves)) if unknown else ())


class _RankFailed(DevinterpError):
    """The same error on every rank of a distributed run (rank zero reports it; the others exit
    quietly with the same status)."""

    def __init__(self, message: str, *, exit_status: int = 2):
        super().__init__(message)
        self.exit_status = int(exit_status)


class _RankZeroFailed(_RankFailed):
    """Raised on ranks > 0 when rank zero's setup failed (rank zero reports the error itself)."""

    def __init__(self, name: str, message: str, status: int):
        super().__init__(f"{name}: {message}", exit_status=status)


def _picklable_error(exc: BaseException | None) -> tuple[str, str, int] | None:
    if exc is None:
        return None
    return type(exc).__name__, " ".join(str(exc).split("\n")), exit_status(exc)


def check_out_dir(out_dir: str) -> None:
    """The results folder must be a folder, and must not hold tables that ``devinterp analyze`` did not write."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise PlanError(f"the results folder {out_dir} is a file, not a folder: pass --out DIR")
    if path.is_dir() and not (path / RESULTS_FILE).exists() and not (path / _OUT_MARKER).exists():
        ours = [n for n in outputs.OWN_FILES if (path / n).exists()]
        if ours:
            raise OutputExistsError(
                f"{out_dir} holds {', '.join(ours)}, which `devinterp analyze` did not write there (no "
                f"{RESULTS_FILE}): it would replace them. Pass another --out DIR")


def _lock_out_dir(out_dir: str) -> WriterLock:
    """One ``devinterp analyze`` at a time per results folder (the store itself is only read)."""
    from devinterp.store import _make_fs

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lock = WriterLock(_make_fs(out_dir), what="results folder", purpose="devinterp analyze",
                      advice="Wait for that analysis to end, or pass another --out DIR.")
    lock.acquire()
    marker = Path(out_dir) / _OUT_MARKER
    if not marker.exists():
        marker.write_text("results.csv, results.json and transitions.json here are written by `devinterp analyze`\n")
    return lock


#: Marks a folder whose tables ``devinterp analyze`` writes (so a later run may rewrite them).
_OUT_MARKER = ".devinterp-analysis"
