"""Which snapshots to analyse (``--steps``) and what remains to be done.

``--steps`` is a comma-separated union of terms, each resolved against the steps the store holds:

=============  ===========================================================================
``all``        every snapshot (the default)
``1200``       the snapshot at step 1200 (an error if there is none; nearby steps are listed)
``100:5000``   every snapshot with 100 <= step <= 5000 (``100:`` and ``:5000`` are open-ended)
``every:10``   every 10th snapshot in step order, starting with the first
``first:5``    the first 5 snapshots; ``last:20`` the last 20
``log:30``     about 30 snapshots spread evenly in log(step + 1), first and last included
=============  ===========================================================================

E.g. ``--steps log:30,last:5`` or ``--steps 0,100:200``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from devinterp.errors import PlanError

__all__ = ["parse_steps", "PlanItem", "Plan", "make_plan", "shard"]


def _int(text: str, term: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PlanError(f"--steps term {term!r}: {text!r} is not an integer") from None
    return value


def _count(text: str, term: str) -> int:
    value = _int(text, term)
    if value <= 0:
        raise PlanError(f"--steps term {term!r}: the count must be >= 1, got {value}")
    return value


def _log_pick(available: Sequence[int], k: int) -> list[int]:
    if k >= len(available):
        return list(available)
    lo, hi = math.log1p(available[0]), math.log1p(available[-1])
    logs = [math.log1p(s) for s in available]
    picked: set[int] = {available[0], available[-1]}
    for i in range(k):
        target = lo + (hi - lo) * i / max(k - 1, 1)
        j = bisect.bisect_left(logs, target)
        cands = [c for c in (j - 1, j) if 0 <= c < len(available)]
        best = min(cands, key=lambda c: abs(logs[c] - target))
        picked.add(available[best])
    return sorted(picked)


def parse_steps(spec: str | None, available: Sequence[int]) -> list[int]:
    """Resolve a ``--steps`` spec (see the module docstring) against the available steps.

    Raises:
        PlanError: A malformed term, an exact step that has no snapshot, or nothing selected.
    """
    available = sorted(set(int(s) for s in available))
    if spec is None or spec.strip() in ("", "all"):
        return available
    chosen: set[int] = set()
    for term in (t.strip() for t in spec.split(",")):
        if not term:
            continue
        if term == "all":
            chosen.update(available)
            continue
        head, sep, tail = term.partition(":")
        if not sep:
            step = _int(term, term)
            if step not in available:
                i = bisect.bisect_left(available, step)
                near = available[max(0, i - 3) : i + 3]
                raise PlanError(f"--steps {term}: no snapshot at step {step}; nearby steps: {near}")
            chosen.add(step)
        elif head == "every":
            chosen.update(available[:: _count(tail, term)])
        elif head == "last":
            chosen.update(available[-_count(tail, term):])
        elif head == "first":
            chosen.update(available[: _count(tail, term)])
        elif head == "log":
            chosen.update(_log_pick(available, _count(tail, term)) if available else [])
        elif all(part == "" or part.isdigit() for part in (head, tail)) and (head or tail):
            lo = int(head) if head else -math.inf
            hi = int(tail) if tail else math.inf
            if lo > hi:
                raise PlanError(f"--steps term {term!r}: the range is empty ({head} > {tail})")
            chosen.update(s for s in available if lo <= s <= hi)
        else:
            raise PlanError(
                f"--steps term {term!r} is not understood; use all, N, A:B, every:K, first:K, last:K or log:K"
            )
    if not chosen:
        span = f"{available[0]}..{available[-1]}" if available else "none"
        raise PlanError(f"--steps {spec!r} selects no snapshot (available steps: {span}, {len(available)} snapshots)")
    return sorted(chosen)


@dataclass(frozen=True)
class PlanItem:
    """One snapshot to load, with the analyses (by name) still to compute on it."""

    step: int
    analyses: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What a run will do.

    Attributes:
        steps: The selected snapshot steps.
        keys: Analysis name -> configuration hash.
        pending: Snapshots with work left, in step order.
        done: Number of (analysis, step) pairs already in the results file and skipped.
    """

    steps: tuple[int, ...]
    keys: tuple[tuple[str, str], ...]
    pending: tuple[PlanItem, ...]
    done: int

    @property
    def num_tasks(self) -> int:
        return sum(len(item.analyses) for item in self.pending)

    def describe(self) -> str:
        names = ", ".join(f"{n} [{h}]" for n, h in self.keys) or "none"
        return (f"{len(self.steps)} snapshot(s) selected; analyses: {names}; {self.done} result(s) already "
                f"done, {self.num_tasks} to compute on {len(self.pending)} snapshot(s)")


def make_plan(steps: Iterable[int], keys: Sequence[tuple[str, str]],
              done: set[tuple[str, int, str]], *, force: bool = False) -> Plan:
    """Pending work: every (analysis, step) whose key ``(name, step, hash)`` is not done (or all, with ``force``)."""
    steps = tuple(sorted(set(steps)))
    pending = []
    n_done = 0
    for step in steps:
        todo = tuple(name for name, h in keys if force or (name, step, h) not in done)
        n_done += len(keys) - len(todo)
        if todo:
            pending.append(PlanItem(step, todo))
    return Plan(steps=steps, keys=tuple(keys), pending=tuple(pending), done=n_done)


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Deterministic round-robin: rank ``r`` of ``W`` gets items ``r, r + W, r + 2W, ...``."""
    return list(items[rank::world_size])
