"""TransitionCallback: flag phase transitions of training curves online.

A thin adapter over :func:`devinterp.analyses.detect_transitions`:

- curves published by other devinterp callbacks are read from
  :func:`devinterp.callbacks._logging.metric_history`;
- metrics the LightningModule logs itself (``self.log("loss/train", ...)``) are sampled from
  ``trainer.callback_metrics`` on a (log-spaced) schedule and recorded into that history;
- every ``check_every`` steps (and at the end of training) each curve with at least ``min_points``
  points is analysed; a transition not seen before (same metric and direction, overlapping ``[start, end]`` or a
  step within ``match_tolerance`` in log step) is flagged once: a text line under the TensorBoard tag
  ``transitions``, a point ``transitions/flag = 1`` at the transition's step (no zeros in
  between); at the end of training each flagged curve gets its marker series
  ``transitions/marker/<metric>``: flat, with a spike across the curve's range at each flag, drawn
  on the curve's own chart (see :mod:`devinterp.tensorboard`).

The flagging logic (when a transition has settled, whether it was flagged before) is
:class:`devinterp.analyses.transitions.TransitionTracker`, which replays a recorded run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

from devinterp.analyses.transitions import Transition
from devinterp.analyses.transitions.online import TransitionTracker
from devinterp.callbacks import _logging
from devinterp.callbacks._trainer import resolve_schedule
from devinterp.errors import InvalidInputError
from devinterp.schedules import Schedule, log_spaced
from devinterp.tensorboard import FLAG_TAG, TEXT_TAG, log_markers

__all__ = ["FLAG_TAG", "TEXT_TAG", "TransitionCallback"]


class TransitionCallback(pl.Callback):
    """Watch metrics during training and flag each phase transition once.

    Args:
        metrics: Names of the curves to watch (e.g. ``["llc/mean", "loss/train"]``).
        sample_schedule: When to sample metrics that the module logs itself; default
            ``log_spaced(200)`` resolved against the run's total steps.
        check_every: Run the detector every this many optimizer steps (and at train end).
        min_points: Minimum points in a curve before it is analysed.
        settle_points, settle_log: When a transition has settled enough to be flagged (see
            :class:`~devinterp.analyses.transitions.TransitionTracker`): ``settle_points`` samples
            after the earlier of its fitting window's end and its 90% point times
            ``exp(settle_log)``; a flag comes a factor ~1.65-2.7 in steps after the transition.
        range_factor: Also wait until training reaches ``range_factor`` times the transition's
            end (so ``min_change`` is measured against a range that includes what followed); at
            the end of training every settled transition is flagged without that wait.
        match_tolerance: Two transitions of the same metric whose steps differ by at most this in
            log step (or whose ``[start, end]`` overlap) are the same transition.
        detector_kwargs: Keyword arguments for :func:`detect_transitions` (e.g. ``min_change``;
            the defaults are those of the post-hoc analysis).
    """

    def __init__(
        self,
        metrics: Sequence[str],
        *,
        sample_schedule: Schedule | None = None,
        check_every: int = 50,
        min_points: int = 30,
        settle_points: int = 8,
        settle_log: float = 0.5,
        range_factor: float = 4.0,
        match_tolerance: float = math.log(1.5),
        detector_kwargs: Mapping[str, Any] | None = None,
    ):
        if isinstance(metrics, str) or not metrics:
            raise InvalidInputError(f"metrics must be a non-empty list of names, got {metrics!r}")
        if check_every <= 0:
            raise InvalidInputError(f"check_every must be > 0, got {check_every}")
        if sample_schedule is not None and not isinstance(sample_schedule, Schedule):
            raise InvalidInputError(f"sample_schedule must be a Schedule, got {type(sample_schedule).__name__}")
        self.tracker = TransitionTracker(min_points=min_points, settle_points=settle_points,
                                         settle_log=settle_log, range_factor=range_factor,
                                         match_tolerance=match_tolerance,
                                         detector_kwargs=detector_kwargs)
        self.metrics = list(metrics)
        self.sample_schedule = sample_schedule or log_spaced(200)
        self.check_every = int(check_every)
        self.min_points = self.tracker.min_points
        self.settle_points = self.tracker.settle_points
        self.match_tolerance = self.tracker.match_tolerance
        self.detector_kwargs = self.tracker.detector_kwargs
        self._sampled: dict[str, list[tuple[int, float]]] = {}
        self._schedule: Schedule | None = None

    @property
    def transitions(self) -> list[Transition]:
        """Every transition flagged so far, in the order flagged."""
        return self.tracker.transitions

    # --- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule = resolve_schedule(self.sample_schedule, trainer)
        for name, series in self._sampled.items():  # restore our samples after a resume
            for step, value in series:
                _logging.record(trainer, name, step, value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._schedule is not None and self._schedule.is_due(step):
            history = _logging.metric_history(trainer)
            for name in self.metrics:
                if name in history and name not in self._sampled:
                    continue  # published by another devinterp callback
                value = trainer.callback_metrics.get(name)
                if value is None:
                    continue
                value = float(value)
                if math.isfinite(value):
                    self._sampled.setdefault(name, []).append((step, value))
                    _logging.record(trainer, name, step, value)
        if step > 0 and step % self.check_every == 0:
            self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer, final=True)
        self.write_markers(trainer)

    def write_markers(self, trainer: pl.Trainer) -> None:
        """Write each flagged curve's marker series (:func:`devinterp.tensorboard.log_markers`),
        in step order over the whole curve, so that TensorBoard draws a flat line with a spike at
        each flag (markers written one flag at a time, out of step order, draw zig-zags)."""
        writer = _logging.tensorboard_writer(trainer)
        if writer is None:
            return
        history = _logging.metric_history(trainer)
        for name in self.metrics:
            flagged = [t.step for t in self.transitions if t.metric == name]
            series = history.get(name, [])
            if flagged and series:
                log_markers(writer, name, [s for s, _ in series], [v for _, v in series], flagged)

    # --- logic (all of it in the tracker) ---------------------------------------------------
    def check(self, trainer: pl.Trainer, *, final: bool = False) -> list[Transition]:
        """Analyse every watched curve now; flag and return the new transitions (``final``: the
        last check of the run, see ``range_factor``)."""
        new: list[Transition] = []
        history = _logging.metric_history(trainer)
        for name in self.metrics:
            series = history.get(name, [])
            steps = [s for s, _ in series]
            values = [v for _, v in series]
            for t in self.tracker.update(name, steps, values, _stderr_for(history, name, steps), final=final):
                new.append(t)
                self._flag(trainer, t)
        return new

    def _flag(self, trainer: pl.Trainer, t: Transition) -> None:
        step = int(round(t.step))
        _logging.log_text(trainer, TEXT_TAG, t.describe(), step=step)
        _logging.log_scalars(trainer, {FLAG_TAG: 1.0}, step=step)

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.tracker.state_dict(),
            "sampled": {k: [list(p) for p in v] for k, v in self._sampled.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
        self._sampled = {k: [(int(s), float(v)) for s, v in pts]
                         for k, pts in state_dict.get("sampled", {}).items()}


def _stderr_for(history, name: str, steps: list[int]) -> list[float] | None:
    """``llc/stderr`` at the same steps for an ``llc/mean`` curve (as post hoc), else None."""
    if not name.endswith("/mean"):
        return None
    err = dict(history.get(name[: -len("mean")] + "stderr", []))
    out = [err.get(s) for s in steps]
    if not out or any(e is None or not math.isfinite(e) or e <= 0 for e in out):
        return None
    return [float(e) for e in out]
