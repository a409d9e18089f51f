"""Essential dynamics: PCA of model outputs across snapshots, and its turning points.

After Hoogland et al. 2024 (arXiv 2402.02364): stack each snapshot's outputs on a fixed probe
batch into one row, project the rows on their top principal components, smooth the trajectory over
log step, and look for milestones: cusps, sharp turns and direction reversals of the smoothed path.

Turning angle at ``x`` (log step) with look-around ``delta``::

    theta(x) = angle(r(x) - r(x - delta), r(x + delta) - r(x))

(0: straight on, pi: reversal). Milestones are local maxima of ``theta`` above ``min_angle`` whose
two legs are each at least ``min_leg`` of the path length, at least ``delta`` apart. The curvature
``kappa = sqrt(|r'|^2 |r''|^2 - (r'.r'')^2) / |r'|^3`` (times the path length: dimensionless)
is reported as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from devinterp.analyses.transitions._series import validate_series
from devinterp.analyses.transitions.smoothing import local_poly
from devinterp.errors import InvalidInputError


@dataclass(frozen=True)
class EssentialDynamics:
    """Result of :func:`essential_dynamics`.

    Attributes:
        steps: Snapshot steps, sorted.
        scores: Projections of the centred outputs on the components, ``(snapshots, k)``.
        components: Principal directions, ``(k, features)``.
        explained_variance_ratio: Fraction of the total variance per component.
        grid_steps: Steps of the smoothed trajectory.
        smoothed: Smoothed trajectory, ``(grid, k)``.
        turning_angle: ``theta`` on the grid, radians.
        curvature: ``kappa * path length`` on the grid.
        milestones: Steps of the turning points.
        milestone_angles: ``theta`` at each milestone, radians.
    """

    steps: np.ndarray
    scores: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    grid_steps: np.ndarray
    smoothed: np.ndarray
    turning_angle: np.ndarray
    curvature: np.ndarray
    milestones: tuple[float, ...]
    milestone_angles: tuple[float, ...]

    def scalars(self) -> dict[str, float]:
        """Explained variance per component and the number of milestones."""
        out = {f"essential_dynamics/evr_pc{i + 1}": float(v)
               for i, v in enumerate(self.explained_variance_ratio)}
        out["essential_dynamics/n_milestones"] = float(len(self.milestones))
        return out


def essential_dynamics(
    outputs,
    steps=None,
    *,
    n_components: int = 3,
    smoothing: float | None = None,
    delta: float | None = None,
    min_angle: float = math.radians(60.0),
    min_leg: float = 0.02,
    log_offset: float = 1.0,
    grid_points: int = 300,
    standardize: bool = False,
) -> EssentialDynamics:
    """PCA of per-snapshot outputs, smoothed over log step, with candidate milestones.

    Args:
        outputs: ``(snapshots, features)`` array (higher-rank arrays are flattened per snapshot),
            a sequence of per-snapshot arrays, or a mapping ``step -> outputs`` (then ``steps``
            must be None).
        steps: Training step of each snapshot; default ``0, 1, ...``.
        n_components: Principal components kept.
        smoothing: Kernel sd of the smooth, log-step units; default ``max(0.15, 2 * median spacing)``.
        delta: Look-around of the turning angle, log-step units; default ``2 * smoothing``.
        min_angle: Minimum turning angle of a milestone, radians (default 60 degrees).
        min_leg: Each leg ``|r(x +- delta) - r(x)|`` must be at least this fraction of the path length.
        log_offset: ``x = log(step + log_offset)``.
        grid_points: Resolution of the smoothed trajectory.
        standardize: Scale each feature to unit variance before the PCA.

    Returns:
        :class:`EssentialDynamics`.
    """
    if isinstance(outputs, Mapping):
        if steps is not None:
            raise InvalidInputError("pass steps either as the mapping's keys or as steps=, not both")
        steps = list(outputs.keys())
        outputs = list(outputs.values())
    rows = [np.asarray(o, dtype=float).reshape(-1) for o in outputs] if not isinstance(
        outputs, np.ndarray) else list(np.asarray(outputs, dtype=float).reshape(len(outputs), -1))
    if len(rows) < 5:
        raise InvalidInputError(f"essential dynamics needs at least 5 snapshots, got {len(rows)}")
    if len({r.size for r in rows}) != 1:
        raise InvalidInputError("every snapshot must have the same number of outputs (same probe batch)")
    X = np.stack(rows)
    if not np.all(np.isfinite(X)):
        raise InvalidInputError("outputs contain NaN or infinite values")
    if not 1 <= n_components <= min(X.shape):
        raise InvalidInputError(f"n_components must be in 1..{min(X.shape)}, got {n_components}")
    if min_angle <= 0 or min_angle >= math.pi or min_leg < 0:
        raise InvalidInputError("need 0 < min_angle < pi and min_leg >= 0")
    steps = np.arange(len(rows), dtype=float) if steps is None else steps
    series = validate_series(steps, np.zeros(len(rows)), log_offset=log_offset, min_points=5, sort=True)
    order = np.argsort(np.asarray(steps, dtype=float), kind="stable")
    X = X[order]

    Xc = X - X.mean(0)
    if standardize:
        sd = Xc.std(0)
        Xc = Xc / np.where(sd > 0, sd, 1.0)
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    total = float((S**2).sum())
    if total <= 0:
        raise InvalidInputError("outputs do not change across snapshots: nothing to analyse")
    k = n_components
    scores = U[:, :k] * S[:k]
    evr = S[:k] ** 2 / total

    x = series.x
    bw = max(0.15, 2.0 * float(np.median(np.diff(x)))) if smoothing is None else float(smoothing)
    d = 2.0 * bw if delta is None else float(delta)
    grid = np.linspace(x[0], x[-1], grid_points)
    fit = local_poly(x, scores, grid, bandwidth=bw, degree=2, robust_iters=1)
    r, r1, r2 = fit[0], fit[1], fit[2]
    seg = np.linalg.norm(np.diff(r, axis=0), axis=1)
    length = float(seg.sum())
    speed2 = (r1**2).sum(1)
    cross2 = np.maximum(speed2 * (r2**2).sum(1) - (r1 * r2).sum(1) ** 2, 0.0)
    curvature = np.sqrt(cross2) / np.maximum(speed2, 1e-300) ** 1.5 * length

    back = np.array([_interp_rows(grid, r, g - d) for g in grid])
    ahead = np.array([_interp_rows(grid, r, g + d) for g in grid])
    v1, v2 = r - back, ahead - r
    n1, n2 = np.linalg.norm(v1, axis=1), np.linalg.norm(v2, axis=1)
    cos = (v1 * v2).sum(1) / np.maximum(n1 * n2, 1e-300)
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    valid = (grid - d >= grid[0]) & (grid + d <= grid[-1]) & (np.minimum(n1, n2) >= min_leg * length)
    theta = np.where(valid, theta, 0.0)

    picks: list[int] = []
    for i in np.argsort(-theta):
        if theta[i] < min_angle:
            break
        if all(abs(grid[i] - grid[j]) >= d for j in picks):
            picks.append(int(i))
    picks.sort()
    return EssentialDynamics(
        steps=series.steps, scores=scores, components=Vt[:k], explained_variance_ratio=evr,
        grid_steps=np.exp(grid) - log_offset, smoothed=r, turning_angle=theta, curvature=curvature,
        milestones=tuple(series.to_step(grid[i]) for i in picks),
        milestone_angles=tuple(float(theta[i]) for i in picks),
    )


def _interp_rows(grid: np.ndarray, r: np.ndarray, g: float) -> np.ndarray:
    g = min(max(g, grid[0]), grid[-1])
    return np.array([np.interp(g, grid, r[:, j]) for j in range(r.shape[1])])


def output_matrix(
    models: Iterable,
    probe,
    *,
    model=None,
    forward: Callable | None = None,
) -> np.ndarray:
    """Outputs of each model (or state dict) on a fixed probe batch, one flattened row per snapshot.

    Args:
        models: ``torch.nn.Module`` objects, or state dicts (then ``model`` is required and each is
            loaded into it in turn, strictly).
        probe: The fixed probe batch (a tensor, or whatever ``forward`` accepts).
        model: Template module for state dicts.
        forward: ``forward(module, probe) -> Tensor``; default ``module(probe)``.

    Returns:
        ``(snapshots, features)`` float64 array, ready for :func:`essential_dynamics`.
    """
    import torch

    from devinterp.errors import StateDictMismatchError

    fwd = forward or (lambda m, p: m(p))
    rows = []
    for item in models:
        if isinstance(item, torch.nn.Module):
            module = item
        elif isinstance(item, Mapping):
            if model is None:
                raise InvalidInputError("state dicts were given: pass model= (a module to load them into)")
            try:
                model.load_state_dict(item, strict=True)
            except RuntimeError as exc:
                raise StateDictMismatchError(f"a state dict does not fit the model: {exc}") from None
            module = model
        else:
            raise InvalidInputError(f"models must be modules or state dicts, got {type(item).__name__}")
        was_training = module.training
        module.eval()
        with torch.no_grad():
            out = fwd(module, probe)
        module.train(was_training)
        rows.append(torch.as_tensor(out).detach().double().cpu().reshape(-1).numpy())
    if not rows:
        raise InvalidInputError("no models given")
    return np.stack(rows)
