"""TransitionCallback: flag phase transitions of training curves online.

A thin adapter over :func:`devinterp.analyses.detect_transitions`:

- curves published by other devinterp callbacks are read from
  :func:`devinterp.callbacks._logging.metric_history`;
- metrics the LightningModule logs itself (``self.log("loss/train", ...)``) are sampled from
  ``trainer.callback_metrics`` on a (log-spaced) schedule and recorded into that history;
- every ``check_every`` steps (and at the end of training) each curve with at least ``min_points``
  points is analysed; a transition not seen before (same metric and direction, overlapping ``[start, end]`` or a
  step within ``match_tolerance`` in log step) is flagged once: a text line under the TensorBoard tag
  ``transitions`` and a point ``transitions/flag = 1`` at the transition's step. No zeros are
  logged between flags: the marker series holds only the flagged steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl

from devinterp.analyses.transitions import Transition, detect_transitions
from devinterp.callbacks import _logging
from devinterp.callbacks._trainer import resolve_schedule
from devinterp.errors import InvalidInputError
from devinterp.schedules import Schedule, log_spaced

FLAG_TAG = "transitions/flag"
TEXT_TAG = "transitions"


class TransitionCallback(pl.Callback):
    """Watch metrics during training and flag each phase transition once.

    Args:
        metrics: Names of the curves to watch (e.g. ``["llc/mean", "loss/train"]``).
        sample_schedule: When to sample metrics that the module logs itself; default
            ``log_spaced(200)`` resolved against the run's total steps.
        check_every: Run the detector every this many optimizer steps (and at train end).
        min_points: Minimum points in a curve before it is analysed.
        settle_points: A transition is flagged only once this many points follow its fitting window
            (``window_end``), so a change still under way at the end of the data, which the local
            baseline can mistake for its opposite, is never flagged half-seen. The price is a delay:
            a flag comes once training is about a factor ``e`` (the window) past the transition.
        match_tolerance: Two transitions of the same metric whose steps differ by at most this in
            log step (or whose ``[start, end]`` overlap) are the same transition.
        detector_kwargs: Keyword arguments for :func:`detect_transitions`.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        *,
        sample_schedule: Schedule | None = None,
        check_every: int = 50,
        min_points: int = 30,
        settle_points: int = 8,
        match_tolerance: float = math.log(1.5),
        detector_kwargs: Mapping[str, Any] | None = None,
    ):
        if isinstance(metrics, str) or not metrics:
            raise InvalidInputError(f"metrics must be a non-empty list of names, got {metrics!r}")
        if check_every <= 0 or min_points < 6 or match_tolerance < 0:
            raise InvalidInputError(
                f"need check_every > 0, min_points >= 6, match_tolerance >= 0; got {check_every}, "
                f"{min_points}, {match_tolerance}"
            )
        if sample_schedule is not None and not isinstance(sample_schedule, Schedule):
            raise InvalidInputError(f"sample_schedule must be a Schedule, got {type(sample_schedule).__name__}")
        kwargs = dict(detector_kwargs or {})
        if "metric" in kwargs:
            raise InvalidInputError("detector_kwargs must not set 'metric' (the callback names the curves)")
        self.metrics = list(metrics)
        self.sample_schedule = sample_schedule or log_spaced(200)
        self.check_every = int(check_every)
        self.min_points = int(min_points)
        if settle_points < 0:
            raise InvalidInputError(f"settle_points must be >= 0, got {settle_points}")
        self.settle_points = int(settle_points)
        self.match_tolerance = float(match_tolerance)
        self.detector_kwargs = kwargs
        self.transitions: list[Transition] = []
        self._sampled: dict[str, list[tuple[int, float]]] = {}
        self._schedule: Schedule | None = None

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
        self.check(trainer)

    # --- logic ------------------------------------------------------------------------------
    def check(self, trainer: pl.Trainer) -> list[Transition]:
        """Analyse every watched curve now; flag and return the new transitions."""
        new: list[Transition] = []
        history = _logging.metric_history(trainer)
        for name in self.metrics:
            series = history.get(name, [])
            if len(series) < self.min_points:
                continue
            steps = [s for s, _ in series]
            values = [v for _, v in series]
            try:
                found = detect_transitions(steps, values, metric=name, **self.detector_kwargs)
            except InvalidInputError:
                continue
            settled_before = steps[-self.settle_points - 1] if self.settle_points else steps[-1]
            for t in found:
                if t.window_end <= settled_before and not self._seen(t):
                    self.transitions.append(t)
                    new.append(t)
                    self._flag(trainer, t)
        return new

    def _seen(self, t: Transition) -> bool:
        lx = math.log1p(max(t.step, 0.0))
        for old in self.transitions:
            if old.metric != t.metric or old.direction != t.direction:
                continue
            if old.start <= t.end and t.start <= old.end:
                return True
            if abs(math.log1p(max(old.step, 0.0)) - lx) <= self.match_tolerance:
                return True
        return False

    def _flag(self, trainer: pl.Trainer, t: Transition) -> None:
        step = int(round(t.step))
        _logging.log_text(trainer, TEXT_TAG, t.describe(), step=step)
        _logging.log_scalars(trainer, {FLAG_TAG: 1.0}, step=step)

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "transitions": [asdict(t) for t in self.transitions],
            "sampled": {k: [list(p) for p in v] for k, v in self._sampled.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.transitions = [Transition(**d) for d in state_dict.get("transitions", [])]
        self._sampled = {k: [(int(s), float(v)) for s, v in pts]
                         for k, pts in state_dict.get("sampled", {}).items()}
