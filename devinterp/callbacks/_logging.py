"""The one place where devinterp callbacks publish scalars and text.

Every devinterp callback logs through :func:`log_scalars`, which

1. sends the values to every logger of the trainer (TensorBoard, CSV, W&B...) at the given step
   (loggers are rank-zero only in Lightning, so this is safe under DDP), and
2. appends them to the trainer's metric history (:func:`metric_history`), where other callbacks
   (e.g. ``TransitionCallback``) read curves without depending on a logger being configured.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl

_HISTORY_ATTR = "_devinterp_metric_history"


def metric_history(trainer: pl.Trainer) -> dict[str, list[tuple[int, float]]]:
    """Per-metric ``[(step, value), ...]`` published by devinterp callbacks during this fit."""
    history = getattr(trainer, _HISTORY_ATTR, None)
    if history is None:
        history = {}
        setattr(trainer, _HISTORY_ATTR, history)
    return history


def record(trainer: pl.Trainer, name: str, step: int, value: float) -> None:
    """Append one point to the metric history (no logger call); a repeated step replaces the last."""
    series = metric_history(trainer).setdefault(name, [])
    if series and series[-1][0] == step:
        series[-1] = (step, float(value))
    else:
        series.append((step, float(value)))


def log_scalars(trainer: pl.Trainer, scalars: Mapping[str, float], step: int | None = None) -> None:
    """Log ``scalars`` to all of the trainer's loggers and to the metric history."""
    step = trainer.global_step if step is None else int(step)
    values = {k: float(v) for k, v in scalars.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    for name, value in values.items():
        record(trainer, name, step, value)


def tensorboard_writer(trainer: pl.Trainer):
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or ``None``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int | None = None) -> None:
    """Write a text summary to TensorBoard, if a TensorBoard logger is attached."""
    writer = tensorboard_writer(trainer)
    if writer is not None:
        writer.add_text(tag, text, trainer.global_step if step is None else int(step))
