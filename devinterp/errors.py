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


class StoreLockedError(StoreError):
    """Another writer holds a folder's writer lock (a live training run, another ``devinterp analyze``).

    Attributes:
        lock_path: The lock file.
        holder: What the lock file records: ``pid``, ``host``, ``started`` (ISO time), ``purpose``.
    """

    def __init__(self, message: str, *, lock_path: str = "", holder: dict | None = None):
        super().__init__(message)
        self.lock_path = lock_path
        self.holder = dict(holder or {})


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


class UsageError(DevinterpError, ValueError):
    """A command-line option is invalid or does not fit the machine (exit status 2)."""


class OutputExistsError(DevinterpError, FileExistsError):
    """A command would overwrite files it did not write; the message names ``--force`` / another ``--out``."""


class DamagedItemsError(DevinterpError):
    """Some items (snapshots, checkpoint files) were damaged; the rest was analysed (exit status 1).

    Attributes:
        damaged: ``(item, message)`` of every damaged item.
    """

    def __init__(self, message: str, *, damaged: tuple = ()):
        super().__init__(message)
        self.damaged = tuple(damaged)


def exit_status(exc: BaseException) -> int:
    """The command-line exit status of an error: 1 for problems found in the data (damaged or
    missing files, a live writer, failed items), 2 for usage errors (bad options, paths, factories)."""
    if isinstance(exc, (StoreNotFoundError, SnapshotNotFoundError)):  # a wrong path or step: usage
        return 2
    if isinstance(exc, (StoreError, DamagedItemsError, ResultsError, ChainDivergedError)):
        return 1
    if isinstance(exc, DevinterpError):
        return int(getattr(exc, "exit_status", 2))
    if isinstance(exc, OSError):
        return 1
    return 2


# --- warnings -------------------------------------------------------------------------------
class DevinterpWarning(UserWarning):
    """Base class of the warnings devinterp emits (filter them with ``warnings.filterwarnings``)."""


class NotAtMinimumWarning(DevinterpWarning):
    """The LLC was estimated at weights that do not look like a local minimum."""


class StaleLockWarning(DevinterpWarning):
    """A writer lock whose holder is gone (same host, its process no longer runs) was recovered."""


class CalibrationWarning(DevinterpWarning):
    """A (reused) SGLD calibration shows signs of no longer fitting the model, or none passed."""
