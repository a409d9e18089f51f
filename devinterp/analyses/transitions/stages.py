"""Stage boundaries agreed on by several curves (LLC, loss, circuit scores...)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from devinterp.analyses.transitions.detect import Transition, detect_transitions
from devinterp.analyses.transitions.llc import Stage, llc_stages
from devinterp.errors import InvalidInputError


@dataclass(frozen=True)
class StageBoundary:
    """A boundary between stages, supported by transitions of one or more metrics.

    Attributes:
        step: Evidence-weighted mean of the member transitions' steps (in log step).
        start: Earliest start of the members.
        end: Latest end of the members.
        metrics: Names of the curves with a transition here, sorted.
        transitions: The member transitions.
        agreement: ``len(metrics) / number of curves``.
    """

    step: float
    start: float
    end: float
    metrics: tuple[str, ...]
    transitions: tuple[Transition, ...]
    agreement: float


@dataclass(frozen=True)
class StageResult:
    """Result of :func:`detect_stages`.

    Attributes:
        boundaries: Stage boundaries, sorted by step.
        stages: The stages between consecutive boundaries (typed A/B when an LLC curve was given).
        transitions: Per-curve transitions that were clustered.
    """

    boundaries: tuple[StageBoundary, ...]
    stages: tuple[Stage, ...]
    transitions: Mapping[str, tuple[Transition, ...]] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        return {"stages/n_boundaries": float(len(self.boundaries)),
                "stages/n_stages": float(len(self.stages))}


def _unpack(name: str, curve) -> tuple:
    if isinstance(curve, Mapping):
        return curve["steps"], curve["values"], curve.get("stderr")
    try:
        parts = tuple(curve)
    except TypeError:
        parts = ()
    if len(parts) not in (2, 3):
        raise InvalidInputError(
            f"curve {name!r} must be (steps, values) or (steps, values, stderr), got {type(curve).__name__}"
        )
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def detect_stages(
    curves: Mapping[str, tuple],
    *,
    tolerance: float = math.log(2.0),
    min_agreement: int = 1,
    llc_key: str | None = "llc",
    log_offset: float = 1.0,
    **detector_kwargs,
) -> StageResult:
    """Combine transitions of several curves into stage boundaries.

    Every curve goes through :func:`detect_transitions`; the transitions of all curves are sorted
    in log step and clustered: a transition joins the current cluster when its step is within
    ``tolerance`` (log-step units) of the cluster's last member or its ``[start, end]`` overlaps the
    cluster's span. A cluster with transitions from at least ``min_agreement`` distinct curves is a
    boundary. If ``llc_key`` names one of the curves, each stage is typed "type A" / "type B" by the
    change of the smoothed LLC over it.

    Args:
        curves: ``name -> (steps, values)`` or ``(steps, values, stderr)`` (or a mapping with keys
            ``steps``, ``values``, ``stderr``).
        tolerance: Clustering distance in log-step units (default log 2: a factor of 2 in steps).
        min_agreement: Minimum number of curves that must agree on a boundary.
        llc_key: Which curve is the LLC (to type the stages); ``None`` to leave stages untyped.
        log_offset: ``x = log(step + log_offset)``, also passed to the detector.
        **detector_kwargs: Passed to :func:`detect_transitions`.

    Returns:
        :class:`StageResult`.
    """
    if not curves:
        raise InvalidInputError("detect_stages needs at least one curve")
    if tolerance <= 0 or min_agreement < 1:
        raise InvalidInputError(f"need tolerance > 0 and min_agreement >= 1, got {tolerance}, {min_agreement}")
    if min_agreement > len(curves):
        raise InvalidInputError(f"min_agreement={min_agreement} exceeds the number of curves ({len(curves)})")
    per: dict[str, tuple[Transition, ...]] = {}
    lo_step, hi_step = math.inf, -math.inf
    for name, curve in curves.items():
        steps, values, stderr = _unpack(name, curve)
        found = detect_transitions(steps, values, stderr=stderr, log_offset=log_offset,
                                   metric=name, **detector_kwargs)
        per[name] = tuple(found)
        arr = np.asarray(steps, dtype=float)
        lo_step, hi_step = min(lo_step, float(arr.min())), max(hi_step, float(arr.max()))

    def lx(s: float) -> float:
        return math.log(s + log_offset)

    every = sorted((t for ts in per.values() for t in ts), key=lambda t: t.step)
    clusters: list[list[Transition]] = []
    for t in every:
        if clusters:
            cur = clusters[-1]
            near = lx(t.step) - lx(cur[-1].step) <= tolerance
            overlap = t.start <= max(m.end for m in cur)
            if near or overlap:
                cur.append(t)
                continue
        clusters.append([t])
    boundaries = []
    for cl in clusters:
        names = tuple(sorted({t.metric for t in cl}))
        if len(names) < min_agreement:
            continue
        w = np.array([max(t.evidence, 1e-9) for t in cl])
        xs = np.array([lx(t.step) for t in cl])
        step = float(np.exp((w * xs).sum() / w.sum()) - log_offset)
        if all(float(t.step).is_integer() for t in cl):
            step = float(round(step))
        boundaries.append(StageBoundary(step, min(t.start for t in cl), max(t.end for t in cl), names,
                                        tuple(cl), len(names) / len(curves)))
    edges = [lo_step, *[b.step for b in boundaries], hi_step]
    typer = None
    if llc_key is not None and llc_key in curves:
        steps, values, stderr = _unpack(llc_key, curves[llc_key])
        typer = llc_stages(steps, values, stderr, log_offset=log_offset)
    stages = []
    for i in range(len(edges) - 1):
        kind, ch, ch_sd = None, float("nan"), float("nan")
        if typer is not None:
            a, b = (np.interp(lx(e), np.log(typer.grid_steps + log_offset), typer.smoothed)
                    for e in edges[i:i + 2])
            ch = float(b - a)
            ch_sd = ch / typer.noise
            kind = "type A" if ch > 0 else "type B"
        stages.append(Stage(i, edges[i], edges[i + 1], kind, ch, ch_sd))
    return StageResult(tuple(boundaries), tuple(stages), per)
