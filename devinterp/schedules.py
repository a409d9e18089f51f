"""When to act during training: pure, resumable step schedules.

A schedule answers ``is_due(step)`` and lists its ``steps(total_steps)``. Schedules combine with
``|`` (or :func:`union`). :func:`log_spaced` with ``stop=None`` is *unresolved* until the total
number of training steps is known; the callbacks call :meth:`Schedule.resolve` at fit start.

Example:
    >>> sched = log_spaced(5, stop=1000) | every(500)
    >>> sched.steps(1000)
    [0, 1, 6, 32, 178, 500, 1000]
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from devinterp.errors import ScheduleError

__all__ = ["Schedule", "every", "log_spaced", "at", "union"]


class Schedule(ABC):
    """Base class. Subclasses are frozen dataclasses implementing ``is_due`` and ``steps``."""

    @abstractmethod
    def is_due(self, step: int) -> bool:
        """Whether ``step`` is scheduled."""

    @abstractmethod
    def steps(self, total_steps: int | None = None) -> list[int]:
        """All scheduled steps in ``[0, total_steps]``, sorted."""

    def resolve(self, total_steps: int | None) -> Schedule:
        """Return a schedule with every open end fixed from the run's total steps."""
        return self

    @property
    def resolved(self) -> bool:
        return True

    def __contains__(self, step: int) -> bool:
        return self.is_due(step)

    def __or__(self, other: Schedule) -> Schedule:
        return union(self, other)


def _check_total(total_steps: int | None, what: str) -> int:
    if total_steps is None:
        raise ScheduleError(f"{what} is unbounded: pass total_steps to list its steps")
    if total_steps < 0:
        raise ScheduleError(f"total_steps must be >= 0, got {total_steps}")
    return int(total_steps)


@dataclass(frozen=True)
class Every(Schedule):
    n: int
    offset: int = 0

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n <= 0:
            raise ScheduleError(f"every(n) needs a positive integer n, got {self.n!r}")
        if self.offset < 0:
            raise ScheduleError(f"every(..., offset) must be >= 0, got {self.offset}")

    def is_due(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.n == 0

    def steps(self, total_steps: int | None = None) -> list[int]:
        total = _check_total(total_steps, f"every({self.n})")
        return list(range(self.offset, total + 1, self.n))


@dataclass(frozen=True)
class LogSpaced(Schedule):
    count: int
    start: int = 1
    stop: int | None = None

    def __post_init__(self):
        if not isinstance(self.count, int) or self.count <= 0:
            raise ScheduleError(f"log_spaced(count) needs a positive integer count, got {self.count!r}")
        if not isinstance(self.start, int) or self.start <= 0:
            raise ScheduleError(
                f"log_spaced(start) must be a positive integer (log spacing cannot start at 0), got {self.start!r}"
            )
        if self.stop is not None and self.stop < self.start:
            raise ScheduleError(f"log_spaced needs stop >= start, got start={self.start}, stop={self.stop}")

    @property
    def resolved(self) -> bool:
        return self.stop is not None

    def resolve(self, total_steps: int | None) -> Schedule:
        if self.stop is not None:
            return self
        if total_steps is None or total_steps < self.start:
            raise ScheduleError(
                "log_spaced(stop=None) takes its stop from the trainer's total steps, which is unknown "
                f"or smaller than start={self.start} (got {total_steps}); set max_steps on the Trainer "
                "or pass stop= explicitly"
            )
        return LogSpaced(self.count, self.start, int(total_steps))

    def _grid(self) -> tuple[int, ...]:
        if self.stop is None:
            raise ScheduleError(
                "log_spaced(stop=None) is unresolved: call .resolve(total_steps) first "
                "(the callbacks do this at fit start)"
            )
        return _log_grid(self.count, self.start, self.stop)

    def is_due(self, step: int) -> bool:
        return step in self._grid()

    def steps(self, total_steps: int | None = None) -> list[int]:
        grid = self._grid()
        return [s for s in grid if total_steps is None or s <= total_steps]


def _log_grid(count: int, start: int, stop: int) -> tuple[int, ...]:
    """``count`` distinct integers from ``start`` to ``stop``, as close to geometric as integers allow.

    Rounding a geometric grid collapses its early points; here each point is pushed to at least one
    past its predecessor while leaving room for the ones after it, so the early part becomes linear
    and exactly ``min(count, stop - start + 1)`` steps come out.
    """
    n = min(count, stop - start + 1)
    if n == 1:
        return (stop,) if count == 1 and start != stop else (start,)
    out: list[int] = []
    ratio = math.log(stop / start)
    for i in range(n):
        ideal = start * math.exp(ratio * i / (n - 1))
        s = max(round(ideal), out[-1] + 1 if out else start)
        s = min(s, stop - (n - 1 - i))
        out.append(s)
    return tuple(out)


@dataclass(frozen=True)
class At(Schedule):
    at_steps: tuple[int, ...]

    def __post_init__(self):
        bad = [s for s in self.at_steps if not isinstance(s, int) or s < 0]
        if bad:
            raise ScheduleError(f"at(steps) needs non-negative integer steps, got {bad}")

    def is_due(self, step: int) -> bool:
        return step in self.at_steps

    def steps(self, total_steps: int | None = None) -> list[int]:
        return sorted(s for s in set(self.at_steps) if total_steps is None or s <= total_steps)


@dataclass(frozen=True)
class Union(Schedule):
    parts: tuple[Schedule, ...]

    @property
    def resolved(self) -> bool:
        return all(p.resolved for p in self.parts)

    def resolve(self, total_steps: int | None) -> Schedule:
        return Union(tuple(p.resolve(total_steps) for p in self.parts))

    def is_due(self, step: int) -> bool:
        return any(p.is_due(step) for p in self.parts)

    def steps(self, total_steps: int | None = None) -> list[int]:
        out: set[int] = set()
        for p in self.parts:
            out.update(p.steps(total_steps))
        return sorted(out)


def every(n: int, offset: int = 0) -> Schedule:
    """Every ``n`` steps: ``offset, offset + n, ...``."""
    return Every(n, offset)


def log_spaced(count: int, start: int = 1, stop: int | None = None) -> Schedule:
    """``count`` log-spaced steps from ``start`` to ``stop`` (default: the run's total steps)."""
    return LogSpaced(count, start, stop)


def at(steps: Iterable[int]) -> Schedule:
    """Exactly the given steps."""
    out = []
    for s in steps:
        try:
            out.append(operator.index(s))
        except TypeError:
            raise ScheduleError(f"at(steps) needs integer steps, got {s!r}") from None
    return At(tuple(out))


def union(*schedules: Schedule) -> Schedule:
    """Steps due in any of ``schedules``."""
    if not schedules:
        raise ScheduleError("union() needs at least one schedule")
    parts: list[Schedule] = []
    for s in schedules:
        if not isinstance(s, Schedule):
            raise ScheduleError(f"union() takes schedules, got {type(s).__name__}")
        parts.extend(s.parts if isinstance(s, Union) else (s,))
    return Union(tuple(parts))
