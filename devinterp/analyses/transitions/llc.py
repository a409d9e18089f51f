"""LLC stage boundaries at critical points of the smoothed LLC over log step.

After Hoogland et al. 2024 ("Loss Landscape Degeneracy Drives Stagewise Development in
Transformers", arXiv 2402.02364): smooth lambda-hat against ``x = log(step)``, take the slope
``d lambda / dx``, and put stage boundaries at critical points, i.e. where the slope is near zero
between two changes (``|slope| < threshold``) or changes sign. A stage where the LLC rises is
"type A", one where it falls is "type B". They smoothed with a Gaussian process; here a robust
Gaussian-kernel local-linear smoother (:func:`~devinterp.analyses.transitions.smoothing.local_poly`)
is used, and a stage whose net LLC change is below ``min_change`` noise sd is merged into a neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.analyses.transitions._series import noise_scale, validate_series
from devinterp.analyses.transitions.smoothing import local_poly
from devinterp.errors import InvalidInputError


@dataclass(frozen=True)
class Stage:
    """A developmental stage ``[start, end]`` (training steps).

    Attributes:
        index: Position of the stage, from 0.
        start: First step of the stage.
        end: Last step of the stage.
        kind: ``"type A"`` (LLC rises), ``"type B"`` (LLC falls), or ``None`` when untyped.
        change: Net change of the smoothed LLC over the stage (nan when untyped).
        change_sd: ``change`` in noise sd (nan when untyped).
    """

    index: int
    start: float
    end: float
    kind: str | None = None
    change: float = float("nan")
    change_sd: float = float("nan")


@dataclass(frozen=True)
class LLCStages:
    """Result of :func:`llc_stages`.

    Attributes:
        boundaries: Stage boundaries as training steps (critical points of the smoothed LLC).
        stages: The stages between them, typed A/B.
        grid_steps: Steps at which the smooth is evaluated.
        smoothed: Smoothed LLC on ``grid_steps``.
        slope: ``d lambda / d log(step)`` on ``grid_steps``.
        threshold: Slope below which the LLC counts as flat.
        noise: Robust noise sd of the LLC (mean over points).
    """

    boundaries: tuple[float, ...]
    stages: tuple[Stage, ...]
    grid_steps: np.ndarray
    smoothed: np.ndarray
    slope: np.ndarray
    threshold: float
    noise: float

    def scalars(self) -> dict[str, float]:
        """Counts of stages by type, keyed ``llc_stages/<name>``."""
        return {
            "llc_stages/n_stages": float(len(self.stages)),
            "llc_stages/n_type_a": float(sum(s.kind == "type A" for s in self.stages)),
            "llc_stages/n_type_b": float(sum(s.kind == "type B" for s in self.stages)),
        }


def llc_stages(
    steps,
    llc,
    stderr=None,
    *,
    bandwidth: float | None = None,
    flat_threshold: float | None = None,
    flat_fraction: float = 0.1,
    min_change: float = 3.0,
    log_offset: float = 1.0,
    grid_points: int = 400,
    noise_floor: float = 0.01,
) -> LLCStages:
    """Split training into stages at critical points of the LLC curve.

    Args:
        steps: Training steps of the LLC estimates.
        llc: LLC estimates (lambda-hat).
        stderr: Optional standard errors of the estimates (weights ``1/stderr^2`` in the smooth).
        bandwidth: Kernel sd in log-step units; default ``max(0.25, 2 * median spacing)``.
        flat_threshold: Absolute slope (LLC units per unit log step) below which the LLC is flat
            (Hoogland et al. used 0.25 for their model); default ``flat_fraction * max|slope|``.
        flat_fraction: See ``flat_threshold``.
        min_change: A stage whose net smoothed change is below this many noise sd is merged.
        log_offset: ``x = log(step + log_offset)``.
        grid_points: Resolution of the smooth.
        noise_floor: Noise sd at least this fraction of the LLC range.

    Returns:
        :class:`LLCStages`.
    """
    if flat_fraction <= 0 or flat_fraction >= 1:
        raise InvalidInputError(f"flat_fraction must be in (0, 1), got {flat_fraction}")
    if min_change < 0 or grid_points < 10:
        raise InvalidInputError("min_change must be >= 0 and grid_points >= 10")
    series = validate_series(steps, llc, stderr, log_offset=log_offset, min_points=5, name="llc")
    x, y = series.x, series.values
    bw = max(0.25, 2.0 * float(np.median(np.diff(x)))) if bandwidth is None else float(bandwidth)
    sigma, _ = noise_scale(series, noise_floor=noise_floor)
    grid = np.linspace(x[0], x[-1], grid_points)
    m, slope = local_poly(x, y, grid, bandwidth=bw, degree=1, weights=1.0 / sigma**2)
    thr = flat_fraction * float(np.abs(slope).max()) if flat_threshold is None else float(flat_threshold)
    label = np.where(slope > thr, 1, np.where(slope < -thr, -1, 0))

    # boundaries: slope minimum inside each flat run between two moving runs, or a sign change
    cuts: list[int] = []
    runs = _runs(label)
    for k, (lab, a, b) in enumerate(runs):
        if lab == 0 and 0 < k < len(runs) - 1:
            cuts.append(a + int(np.argmin(np.abs(slope[a:b]))))
        elif lab != 0 and k + 1 < len(runs) and runs[k + 1][0] == -lab:
            cuts.append(b - 1 if abs(slope[b - 1]) < abs(slope[b]) else b)
    cuts = sorted(set(cuts))

    noise = float(np.mean(sigma))
    edges = [0, *cuts, grid_points - 1]
    # merge insignificant stages into the neighbour giving the larger combined change
    while len(edges) > 2:
        changes = [m[edges[i + 1]] - m[edges[i]] for i in range(len(edges) - 1)]
        i = int(np.argmin(np.abs(changes)))
        if abs(changes[i]) >= min_change * noise:
            break
        if i == 0:
            edges.pop(1)
        elif i == len(changes) - 1:
            edges.pop(-2)
        else:
            left = abs(changes[i - 1] + changes[i])
            right = abs(changes[i] + changes[i + 1])
            edges.pop(i if left >= right else i + 1)
    to_step = series.to_step
    stages = []
    for i in range(len(edges) - 1):
        ch = float(m[edges[i + 1]] - m[edges[i]])
        stages.append(Stage(i, to_step(grid[edges[i]]), to_step(grid[edges[i + 1]]),
                            "type A" if ch > 0 else "type B", ch, ch / noise))
    grid_steps = np.exp(grid) - log_offset
    return LLCStages(tuple(to_step(grid[e]) for e in edges[1:-1]), tuple(stages), grid_steps,
                     m, slope, thr, noise)


def _runs(label: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs ``(label, start, stop)`` of equal labels."""
    out = []
    start = 0
    for i in range(1, label.size + 1):
        if i == label.size or label[i] != label[start]:
            out.append((int(label[start]), start, i))
            start = i
    return out
