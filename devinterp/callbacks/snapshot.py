"""``SnapshotCallback``: record the weights of a Lightning run on a schedule, into a SnapshotStore.

A thin adapter: it decides *when* with a pure schedule, gathers the weights and hands them to
:class:`devinterp.store.SnapshotStore`, which owns the format and the crash-safety rules.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from devinterp.callbacks._gate import StepGate
from devinterp.errors import InvalidInputError, ScheduleError
from devinterp.schedules import Schedule, log_spaced
from devinterp.store import BackgroundSaver, SnapshotStore, detached_copy

__all__ = ["SnapshotCallback", "full_state_dict"]

_DEFAULT_SCHEDULE = log_spaced(100)


class SnapshotCallback(Callback):
    """Save the model's weights at scheduled optimizer steps (and at step 0) into a snapshot store.

    Args:
        dirpath: Store location: a local path or fsspec URL. Default: ``<trainer.log_dir>/snapshots``
            (the first logger's version directory, else ``default_root_dir/snapshots``). When a run
            resumes from a checkpoint, the store recorded in the checkpoint is used again.
        schedule: When to save, in ``trainer.global_step`` units. Default ``log_spaced(100)``, whose
            end is resolved at fit start from ``max_steps`` (or the estimated stepping batches).
        save_initial: Also save the initial weights (step 0).
        background: Serialise, hash and fsync in a worker thread; the training thread only copies
            the weights. A checkpoint (``state_dict``) waits for pending snapshots first.
        max_pending_bytes: With ``background``, how many bytes of weight copies may wait in
            memory before training blocks (one snapshot may always wait).

    A snapshot is taken in ``on_train_batch_end`` only when ``global_step`` advanced (so gradient
    accumulation is handled) and the new step is scheduled; the check is a set lookup. Each index
    record carries ``epoch``, ``samples_seen`` (counted from the batches' leading dimension times
    the world size; ``None`` when a batch has no recognisable size), ``train_loss`` (``loss`` of the
    batch that completed the step, else a ``train_loss``/``loss`` metric) and ``wall_time``.

    Multi-process: every rank runs the same decisions and gathers the full state dict (a collective
    on sharded strategies such as FSDP, DeepSpeed stage 3 or ModelParallel); only global rank zero
    writes. Resuming from a checkpoint at step S supersedes what the interrupted run wrote after S,
    so the store shows each scheduled step exactly once.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        schedule: Schedule = _DEFAULT_SCHEDULE,
        *,
        save_initial: bool = True,
        background: bool = True,
        max_pending_bytes: int = 512 * 2**20,
    ):
        if not isinstance(schedule, Schedule):
            raise ScheduleError(
                f"schedule must be a devinterp.schedules.Schedule (every, log_spaced, at...), got {type(schedule).__name__}"
            )
        if max_pending_bytes < 1:
            raise InvalidInputError(f"max_pending_bytes must be >= 1, got {max_pending_bytes}")
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.schedule = schedule
        self.save_initial = bool(save_initial)
        self.background = bool(background)
        self.max_pending_bytes = int(max_pending_bytes)
        self.store: SnapshotStore | None = None  # rank zero only, during fit
        self._saver: BackgroundSaver | None = None
        self._resolved_dirpath: str | None = None
        self._restored_dirpath: str | None = None
        self._gate = StepGate(schedule, owner="SnapshotCallback", initial=self.save_initial)
        self._samples_seen: int | None = 0
        self._restored = False

    # ---- public ---------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # Two snapshot callbacks in one trainer keep separate states in a checkpoint.
        return self._generate_state_key(dirpath=self.dirpath, schedule=repr(self.schedule))

    @property
    def resolved_dirpath(self) -> str | None:
        """Where snapshots go (known from fit start on)."""
        return self._resolved_dirpath

    def is_due(self, step: int) -> bool:
        return self._gate.is_due(step)

    # ---- Lightning hooks ------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Everything is restored by now (weights, loops, this callback's state): global_step is S.
        if self.dirpath is not None:
            dirpath = self.dirpath
        elif self._restored_dirpath is not None:
            dirpath = self._restored_dirpath
        else:
            dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "snapshots")  # all ranks
        self._resolved_dirpath = dirpath
        act_now = self._gate.start(trainer)  # resolves the schedule; 0, a resumed due step, or None
        resolved, total = self._gate.resolved, self._gate.total
        due = self._gate.planned_steps() if total is not None else None
        step = trainer.global_step
        if step == 0:
            self._samples_seen = 0
        elif not self._restored:  # resumed from a checkpoint written without this callback
            self._samples_seen = None
        if trainer.is_global_zero:
            self.store = SnapshotStore(dirpath, mode="a")
            dm = trainer.datamodule if getattr(trainer, "datamodule", None) is not None else None
            self.store.write_run(
                model_class=type(pl_module),
                hparams=dict(pl_module.hparams),
                datamodule_class=type(dm) if dm is not None else None,
                datamodule_hparams=dict(dm.hparams) if dm is not None else None,
                extra={
                    "snapshot_schedule": repr(resolved),
                    "total_steps": total,
                    "planned_snapshots": len(due) if due is not None else None,
                    "world_size": trainer.world_size,
                },
            )
            self.store.truncate_after(step)  # a resumed (or re-run) fit replaces what came later
            if self.background:
                self._saver = BackgroundSaver(self.store, max_pending_bytes=self.max_pending_bytes)
        if act_now is not None:
            # Step S of a resumed run is written when the checkpoint does not record it as done
            # (the interrupted run died between the checkpoint and its snapshot).
            self._snapshot(trainer, pl_module, act_now, outputs=None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._samples_seen is not None:
            n = _leading_size(batch)
            self._samples_seen = None if n is None else self._samples_seen + n * trainer.world_size
        step = trainer.global_step
        if self._gate.reached(step):  # a new optimizer step that is due (accumulation handled)
            self._snapshot(trainer, pl_module, step, outputs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Keep what was already handed over; do not mask the original exception.
        try:
            self._close()
        except Exception:
            pass

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def state_dict(self) -> dict[str, Any]:
        if self._saver is not None:  # a checkpoint implies its snapshots are on disk
            self._saver.flush()
        return {
            "dirpath": self._resolved_dirpath,
            "samples_seen": self._samples_seen,
            "schedule": repr(self.schedule),
            **self._gate.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = True
        self._gate.load_state_dict(state_dict)
        self._restored_dirpath = state_dict.get("dirpath")
        self._samples_seen = state_dict.get("samples_seen")

    # ---- internals ------------------------------------------------------------------------

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, outputs: Any) -> None:
        state = full_state_dict(trainer, pl_module)  # collective on sharded strategies: all ranks
        if not trainer.is_global_zero:
            return
        assert self.store is not None
        meta = {
            "epoch": trainer.current_epoch,
            "samples_seen": self._samples_seen,
            "train_loss": _train_loss(trainer, outputs),
            "wall_time": time.time(),
        }
        if self._saver is not None:
            self._saver.submit(step, detached_copy(state), meta)
        else:
            self.store.save(step, state, meta)

    def _close(self) -> None:
        """Commit what is pending, then release the store's writer lock (run end, error, teardown)."""
        saver, self._saver = self._saver, None
        try:
            if saver is not None:
                saver.close()
        finally:
            store = self.store
            if store is not None:
                store.close()


def full_state_dict(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
    """The LightningModule's full (unsharded) state dict, the way Lightning gathers it.

    Must be called on every rank: for sharded strategies it is a collective. On FSDP the full
    state is materialised on rank zero only (offloaded to CPU); other ranks get an empty dict.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

        with _get_full_state_dict_context(strategy.model, world_size=strategy.world_size):
            return strategy.model.state_dict()
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(strategy.model, options=options)
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        params = list(pl_module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            # copy while gathered: the parameters are re-partitioned when the context exits
            return detached_copy(pl_module.state_dict()) if trainer.is_global_zero else {}
    return strategy.lightning_module_state_dict()


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else None
    if isinstance(batch, Mapping):
        items = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return None
    for item in items:
        n = _leading_size(item)
        if n is not None:
            return n
    return None


def _train_loss(trainer: pl.Trainer, outputs: Any) -> float | None:
    loss = outputs
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if not isinstance(loss, Tensor):
        metrics = trainer.callback_metrics
        loss = next((metrics[k] for k in ("train_loss", "train/loss", "loss") if k in metrics), None)
    if isinstance(loss, Tensor) and loss.numel() == 1:
        value = float(loss.detach().float().cpu())
        return value if math.isfinite(value) else None
    if isinstance(loss, (int, float)):
        return float(loss)
    return None

