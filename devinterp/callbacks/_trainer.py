"""Facts about the running trainer that every devinterp callback needs, in one place."""

from __future__ import annotations

import math

import lightning.pytorch as pl

from devinterp.schedules import Schedule


def total_steps(trainer: pl.Trainer) -> int | None:
    """The run's total optimizer steps: ``max_steps`` if set, else Lightning's estimate, else None."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        est = trainer.estimated_stepping_batches
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None
    if est is None or not math.isfinite(est):
        return None
    return int(est)


def resolve_schedule(schedule: Schedule, trainer: pl.Trainer) -> Schedule:
    """``schedule`` with its open ends (e.g. ``log_spaced(stop=None)``) fixed from the trainer."""
    return schedule.resolve(total_steps(trainer))
