"""The exceptions this library raises.

Every error a user can cause derives from :class:`DevinterpError`, so ``except DevinterpError``
catches all of them; each also derives from the closest built-in (``ValueError``, ``KeyError``,
...) so that generic handlers keep working. Messages say what was wrong and what to do.
"""

from __future__ import annotations


class DevinterpError(Exception):
    """Base class of every error raised by devinterp."""


# --- snapshot store -------------------------------------------------------------------------
class StoreError(DevinterpError):
    """A snapshot store cannot be opened, read or written."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path given as a snapshot store does not exist or holds no store."""


class EmptyStoreError(StoreError):
    """The store exists but holds no snapshot."""


class SnapshotNotFoundError(StoreError, KeyError):
    """No snapshot at the requested step."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CorruptSnapshotError(StoreError):
    """A snapshot file is truncated, unreadable or fails its checksum. The message names the file."""


class StateDictMismatchError(DevinterpError, ValueError):
    """Weights do not fit a model: missing/unexpected keys or shape mismatches, all listed."""


# --- schedules ------------------------------------------------------------------------------
class ScheduleError(DevinterpError, ValueError):
    """A schedule was given invalid values or used before it was resolved."""


# --- sampling / estimation ------------------------------------------------------------------
class InvalidInputError(DevinterpError, ValueError):
    """An argument of an analysis is invalid (empty data, non-scalar loss, bad hyper-parameter...)."""


class ChainDivergedError(DevinterpError, RuntimeError):
    """An SGMCMC chain produced a non-finite or exploding loss."""

    def __init__(self, message: str, *, chain: int | None = None, step: int | None = None,
                 suggested_step_size: float | None = None):
        super().__init__(message)
        self.chain = chain
        self.step = step
        self.suggested_step_size = suggested_step_size


# --- circuits -------------------------------------------------------------------------------
class AttentionNotFoundError(DevinterpError, RuntimeError):
    """No attention computation was seen while running the model."""


# --- command line / post-hoc ----------------------------------------------------------------
class FactoryError(DevinterpError, ValueError):
    """A ``package.module:factory`` path does not import, or the factory returned nothing usable."""


class ResultsError(DevinterpError, ValueError):
    """A post-hoc results file is damaged (a line other than the last is not a valid record)."""


class PlanError(DevinterpError, ValueError):
    """A post-hoc analysis request cannot be planned: bad ``--steps`` spec, no analysis, no snapshot."""


# --- warnings -------------------------------------------------------------------------------
class DevinterpWarning(UserWarning):
    """Base class of the warnings devinterp emits (filter them with ``warnings.filterwarnings``)."""


class NotAtMinimumWarning(DevinterpWarning):
    """The LLC was estimated at weights that do not look like a local minimum."""


class CalibrationWarning(DevinterpWarning):
    """A (reused) SGLD calibration shows signs of no longer fitting the model, or none passed."""
