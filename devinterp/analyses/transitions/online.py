"""Online transition flagging: the logic of ``TransitionCallback`` as a plain, replayable object.

A :class:`TransitionTracker` is given the curve seen so far at each check and returns the
transitions it flags now. It flags a transition once: when the detector's fitting window has
closed (``settle_points`` samples after ``window_end``) and no earlier flag of the same metric and
direction matches it. Because it holds no Lightning state, the same tracker replays a finished
run's recorded curves (:func:`replay`) and gives exactly the flags the callback gave.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from devinterp.analyses.transitions.detect import (
    Transition,
    bracket,
    curve_range,
    detect_transitions,
)
from devinterp.errors import InvalidInputError


class TransitionTracker:
    """Flag each transition of each curve once, as the curves grow.

    Args:
        min_points: A curve is analysed once it has this many points.
        settle_points: A transition is flagged only once this many points follow its settling
            step, so a change still under way at the end of the data is never flagged half-seen.
        settle_log: The settling step is the end of the detector's fitting window
            (``window_end``) or, if earlier, the transition's end (90% point) times
            ``exp(settle_log)`` (default 0.5: a factor 1.65 in steps). A flag therefore comes a
            factor ~1.65-2.7 in steps after the transition's end.
        range_factor: Before the final check, a transition is also held back until the curve
            has been followed to ``range_factor`` times the transition's end (in steps), so the
            range that ``min_change`` is measured against includes what came after it (an early,
            small move is not flagged just because nothing larger had happened yet). The final
            check (``final=True``, at the end of training) does not wait: the range is then the
            whole curve's, as post hoc. 1 disables the wait.
        match_tolerance: Two transitions of the same metric and direction whose steps differ by at
            most this in log step (or whose ``[start, end]`` overlap) are the same transition.
        detector_kwargs: Keyword arguments for :func:`detect_transitions` (``min_change`` etc.).
    """

    def __init__(self, *, min_points: int = 30, settle_points: int = 8, settle_log: float = 0.5,
                 range_factor: float = 4.0, match_tolerance: float = math.log(1.5), detector_kwargs: Mapping[str, Any] | None = None):
        if min_points < 6 or settle_points < 0 or settle_log < 0 or match_tolerance < 0 or range_factor < 1:
            raise InvalidInputError(
                f"need min_points >= 6, settle_points >= 0, settle_log >= 0, match_tolerance >= 0, "
                f"range_factor >= 1; got {min_points}, {settle_points}, {settle_log}, {match_tolerance}, "
                f"{range_factor}"
            )
        kwargs = dict(detector_kwargs or {})
        if "metric" in kwargs:
            raise InvalidInputError("detector_kwargs must not set 'metric' (the tracker names the curves)")
        self.min_points = int(min_points)
        self.settle_points = int(settle_points)
        self.settle_log = float(settle_log)
        self.range_factor = float(range_factor)
        self.match_tolerance = float(match_tolerance)
        self.detector_kwargs = kwargs
        self.transitions: list[Transition] = []

    def update(self, metric: str, steps: Sequence[float], values: Sequence[float],
               stderr: Sequence[float] | None = None, *, final: bool = False) -> list[Transition]:
        """Analyse ``metric``'s curve so far; return (and remember) the transitions flagged now.

        A curve shorter than ``min_points`` or that the detector rejects yields nothing.
        ``final=True`` marks the last check (the curve is complete; see ``range_factor``).
        """
        if len(steps) < self.min_points:
            return []
        try:
            found = detect_transitions(steps, values, stderr=stderr, metric=metric, **self.detector_kwargs)
        except InvalidInputError:
            return []
        ordered = np.sort(np.asarray(steps, dtype=float))
        settled_before = ordered[-self.settle_points - 1] if self.settle_points else ordered[-1]
        new = []
        for t in found:
            waited = final or (ordered[-1] + 1.0) >= self.range_factor * (t.end + 1.0)
            if waited and self.settles_at(t) <= settled_before and not self.seen(t):
                self.transitions.append(t)
                new.append(t)
        return new

    def settles_at(self, t: Transition) -> float:
        """The step after which ``settle_points`` samples must follow before ``t`` is flagged."""
        return min(t.window_end, (t.end + 1.0) * math.exp(self.settle_log) - 1.0)

    def seen(self, t: Transition) -> bool:
        """Whether ``t`` matches a transition flagged before."""
        lx = math.log1p(max(t.step, 0.0))
        for old in self.transitions:
            if old.metric != t.metric or old.direction != t.direction:
                continue
            if old.start <= t.end and t.start <= old.end:
                return True
            if abs(math.log1p(max(old.step, 0.0)) - lx) <= self.match_tolerance:
                return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"transitions": [asdict(t) for t in self.transitions]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.transitions = [Transition(**d) for d in state.get("transitions", [])]


def replay(curves: Mapping[str, tuple], check_steps: Sequence[int],
           tracker: TransitionTracker | None = None) -> list[Transition]:
    """Run a tracker over recorded curves as the callback would have during training.

    Args:
        curves: ``{metric: (steps, values)}`` or ``(steps, values, stderr)`` (what the callback's
            history held at the end; the callback uses ``llc/stderr`` for ``llc/mean``).
        check_steps: The steps at which the callback checked (e.g. every ``check_every`` steps and
            the last step, which is the final check).
        tracker: The tracker to use (default: a new one with default settings).

    Returns:
        All flags, in the order they were raised.
    """
    tracker = tracker or TransitionTracker()
    flags: list[Transition] = []
    checks = sorted(check_steps)
    for k, step in enumerate(checks):
        for metric, curve in curves.items():
            s, v = np.asarray(curve[0]), np.asarray(curve[1], dtype=float)
            e = np.asarray(curve[2], dtype=float) if len(curve) > 2 and curve[2] is not None else None
            keep = (s <= step) & np.isfinite(v)
            flags += tracker.update(metric, s[keep], v[keep], None if e is None else e[keep],
                                    final=k == len(checks) - 1)
    return flags


def relative_move(steps, values, t: Transition) -> float:
    """How far a curve moves across a flag, as a fraction of its range (:func:`curve_range`).

    The move is the difference between the curve's values at the samples bracketing the flag's
    ``[start, end]`` (the last sample at or before ``start`` and the first at or after ``end``; for
    a step sharper than the sampling, at a sample, the samples either side of it).
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    order = np.argsort(s)
    s, v = s[order], v[order]
    i, j = bracket(s, t.start, t.end)
    span = curve_range(v)
    return float(abs(v[j] - v[i]) / span) if span > 0 else 0.0
