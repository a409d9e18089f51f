"""Input validation and the log-step axis shared by the transition analyses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.errors import InvalidInputError


@dataclass(frozen=True)
class Series:
    """A validated curve: steps sorted ascending, ``x = log(step + log_offset)``."""

    steps: np.ndarray
    x: np.ndarray
    values: np.ndarray
    stderr: np.ndarray | None
    log_offset: float
    integer_steps: bool

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def to_step(self, x: float) -> float | int:
        """Map a log-step coordinate back to a training step (an int when the input steps were)."""
        step = float(np.exp(x) - self.log_offset)
        step = min(max(step, float(self.steps[0])), float(self.steps[-1]))
        return int(round(step)) if self.integer_steps else step


def validate_series(
    steps,
    values,
    stderr=None,
    *,
    log_offset: float = 1.0,
    min_points: int = 3,
    sort: bool = True,
    name: str = "values",
) -> Series:
    """Check a curve and put it on the log-step axis.

    Args:
        steps: Training steps, one per value (any order if ``sort``; duplicates are an error).
        values: The metric at each step; must be finite.
        stderr: Optional per-point standard errors, positive and finite.
        log_offset: Added to the steps before the logarithm, so that step 0 is allowed.
        min_points: Fewer points than this is an error.
        sort: Sort unsorted input by step; if False, unsorted input is an error.
        name: How to call the values in error messages.

    Raises:
        InvalidInputError: on any problem, saying what to fix.
    """
    try:
        s = np.asarray(steps, dtype=float).reshape(-1) if np.ndim(steps) <= 1 else None
        v = np.asarray(values, dtype=float).reshape(-1) if np.ndim(values) <= 1 else None
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"steps and {name} must be 1-D sequences of numbers: {exc}") from None
    if s is None or v is None:
        raise InvalidInputError(f"steps and {name} must be 1-D, got shapes {np.shape(steps)} and {np.shape(values)}")
    if s.shape != v.shape:
        raise InvalidInputError(f"steps and {name} must have the same length, got {s.size} and {v.size}")
    if s.size < min_points:
        raise InvalidInputError(f"need at least {min_points} points to analyse {name}, got {s.size}")
    if not np.all(np.isfinite(s)):
        raise InvalidInputError("steps contain NaN or infinite values")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise InvalidInputError(
            f"{name} contain {bad.size} NaN/infinite value(s) (first at step {s[bad[0]]:g}); "
            "drop those points before calling"
        )
    if not np.isfinite(log_offset) or log_offset < 0:
        raise InvalidInputError(f"log_offset must be finite and >= 0, got {log_offset}")
    if np.any(s + log_offset <= 0):
        raise InvalidInputError(
            f"steps + log_offset must be > 0 for the log-step axis (min step {s.min():g}, "
            f"log_offset {log_offset:g}); raise log_offset or drop step <= 0"
        )
    e = None
    if stderr is not None:
        e = np.asarray(stderr, dtype=float).reshape(-1)
        if e.shape != v.shape:
            raise InvalidInputError(f"stderr must have one entry per value, got {e.size} for {v.size}")
        if not np.all(np.isfinite(e)) or np.any(e <= 0):
            raise InvalidInputError("stderr must be finite and > 0 everywhere")
    order = np.argsort(s, kind="stable")
    if np.any(order != np.arange(s.size)):
        if not sort:
            raise InvalidInputError("steps must be sorted ascending (or pass sort=True)")
        s, v = s[order], v[order]
        e = e[order] if e is not None else None
    if np.any(np.diff(s) == 0):
        dup = s[np.flatnonzero(np.diff(s) == 0)[0]]
        raise InvalidInputError(f"steps must be distinct, step {dup:g} appears more than once")
    integer = bool(np.all(s == np.round(s)))
    return Series(s, np.log(s + log_offset), v, e, float(log_offset), integer)


def robust_scale(z: np.ndarray) -> float:
    """Normalised median absolute deviation (1.4826 * MAD): the sd for Gaussian data."""
    z = np.asarray(z, dtype=float)
    if z.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(z - np.median(z))))


def local_residuals(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual of each interior point from the line through its two neighbours.

    ``r_i = y_i - (b_i y_{i-1} + a_i y_{i+1})`` with ``a_i = (x_i - x_{i-1}) / (x_{i+1} - x_{i-1})``,
    ``b_i = 1 - a_i``. For independent noise of sd sigma, ``Var r_i = sigma^2 (1 + a_i^2 + b_i^2)``;
    a smooth trend contributes only its curvature, a jump only two residuals.

    Returns:
        ``(r, a, b)`` for the interior points ``1 .. n-2``.
    """
    a = (x[1:-1] - x[:-2]) / (x[2:] - x[:-2])
    b = 1.0 - a
    r = y[1:-1] - (b * y[:-2] + a * y[2:])
    return r, a, b


def noise_scale(series: Series, *, noise_floor: float = 0.01) -> tuple[np.ndarray, float]:
    """Robust per-point noise sd of a curve, and the scale factor applied to ``stderr``.

    Without ``stderr``: ``sigma = 1.4826 MAD(r_i / sqrt(1 + a_i^2 + b_i^2))`` from
    :func:`local_residuals`. With ``stderr``: the residuals are standardised by their propagated
    stderr and ``sigma_i = c * stderr_i`` with ``c`` the robust scale of the standardised residuals,
    so a stderr that over- or under-states the scatter is corrected. Either way ``sigma_i`` is floored
    at ``noise_floor * (max(values) - min(values))`` so noiseless curves still have a scale.
    """
    x, y = series.x, series.values
    span = float(np.ptp(y))
    floor = noise_floor * span if span > 0 else 1e-12
    if series.n < 3:
        return np.full(series.n, max(floor, 1e-12)), 1.0
    r, a, b = local_residuals(x, y)
    if series.stderr is None:
        sigma = robust_scale(r / np.sqrt(1 + a**2 + b**2))
        out = np.full(series.n, sigma)
        factor = 1.0
    else:
        e = series.stderr
        prop = np.sqrt(e[1:-1] ** 2 + (b * e[:-2]) ** 2 + (a * e[2:]) ** 2)
        factor = robust_scale(r / prop)
        out = factor * e
    return np.maximum(out, max(floor, 1e-12)), float(factor)
