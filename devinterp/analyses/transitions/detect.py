"""Sigmoid transitions against a smooth local baseline, in log-step space.

Model (for one candidate centre ``c`` and width ``w``, on a window of points around ``c``)::

    H0:  y(x) = p(u)                                   (local polynomial baseline)
    H1:  y(x) = p(u) + A * (sigmoid((x - c) / w) - 1/2)

with ``x = log(step + log_offset)``, ``u = (x - c) / h`` and ``p`` a polynomial of degree
``baseline_degree`` (default 2). The window spans ``c +- window_factor * w`` (at least
``min_window_points`` on each side), so a transition always looks like a step inside its window
while smooth drift looks like a polynomial. Evidence is the robust deviance difference

    D = 2 * sum_i [rho(r0_i / sigma_i) - rho(r1_i / sigma_i)]

with the Huber loss ``rho`` (a chi-square difference for Gaussian noise) and ``sigma_i`` the robust
noise scale (see :func:`~devinterp.analyses.transitions._series.noise_scale`). A transition is
reported when ``D >= penalty`` (BIC-like: ``penalty_factor * log(n)``, three extra parameters
``A, c, w``) and ``|A| / sigma >= min_magnitude``. Transitions are found greedily: the best one is
removed from the curve and the scan repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from devinterp.analyses.transitions._series import (
    Series,
    local_residuals,
    noise_scale,
    validate_series,
)
from devinterp.errors import InvalidInputError

METHOD = "local-sigmoid-vs-polynomial"
_SPAN_10_90 = 2.0 * math.log(9.0)  # 10%-90% span of a logistic of unit width
MAX_WIDTH = 0.4  # widest sigmoid scanned (log-step units); slower changes are drift
WINDOW_WIDTHS = 6.0  # fitting window half-width >= this many sigmoid widths
MIN_CHANGE = 0.1  # smallest |amplitude| reported, as a fraction of the curve's range
_DRIFT_WIDTH = 2.0  # a refined width above max_width (up to this factor) marks drift
_BROAD_SLACK = 1.15  # the widest grid shape may refine this much wider and still be judged
_MOVE_SLACK = 6.0  # noise sd by which the move may fall short of the minimum change
_NARROWER = 1.5  # a rejected candidate does not block shapes narrower than its width / this
_COMPLETE = 2.5  # the window must hold c +- 2.5 w (8%..92% of the change): no edge extrapolation


@dataclass(frozen=True)
class Transition:
    """One detected transition of a curve.

    Attributes:
        step: Best estimate of the transition's midpoint, as a training step (not an index).
        start: Step where the transition starts (10% of the change; clipped to the data).
        end: Step where it ends (90% of the change; clipped to the data).
        direction: ``"rise"`` or ``"fall"``.
        kind: ``"step"`` (sharper than the sampling can resolve), ``"sigmoid"``, or, from the LLC
            stage method, ``"type A"`` / ``"type B"`` / ``"llc_critical_point"``.
        magnitude: Size of the change in noise units, ``|A| / sigma``.
        confidence: ``1 / (1 + exp(-(evidence - penalty) / 2))``: the BIC approximation of the
            posterior probability of a transition against the smooth baseline; > 0.5 when reported.
        method: Name of the detector that produced it.
        amplitude: Signed size of the change in the units of the values.
        width: Logistic width in log-step units (the 10-90% span is ``4.39 * width``).
        evidence: Robust deviance difference ``D`` between the models with and without it.
        penalty: Threshold ``D`` had to pass.
        noise: Robust noise sd used at the transition (units of the values).
        n_window: Number of points in the fitting window.
        window_start: First step of the fitting window.
        window_end: Last step of the fitting window.
        metric: Name of the curve, when known (set by :func:`detect_stages` and the callback).
    """

    step: float
    start: float
    end: float
    direction: str
    kind: str
    magnitude: float
    confidence: float
    method: str
    amplitude: float = float("nan")
    width: float = float("nan")
    evidence: float = float("nan")
    penalty: float = float("nan")
    noise: float = float("nan")
    n_window: int = 0
    window_start: float = float("nan")
    window_end: float = float("nan")
    metric: str | None = None

    def scalars(self) -> dict[str, float]:
        """The numeric fields, keyed ``transition/<field>``."""
        keys = ("step", "start", "end", "magnitude", "confidence", "amplitude", "width",
                "evidence", "penalty", "noise", "n_window")
        return {f"transition/{k}": float(getattr(self, k)) for k in keys}

    def describe(self) -> str:
        """One readable line (used as TensorBoard text)."""
        who = f"{self.metric}: " if self.metric else ""
        return (
            f"{who}{self.direction} ({self.kind}) at step {self.step:g} "
            f"[{self.start:g}, {self.end:g}], {self.magnitude:.1f} noise sd, "
            f"confidence {self.confidence:.3f}, evidence {self.evidence:.1f} > {self.penalty:.1f} ({self.method})"
        )


def _huber_rho(z: np.ndarray, k: float) -> np.ndarray:
    a = np.abs(z)
    return np.where(a <= k, 0.5 * z**2, k * a - 0.5 * k**2)


def _design(x: np.ndarray, c: float, h: float, degree: int, w: float | None) -> np.ndarray:
    u = (x - c) / h
    cols = [u**d for d in range(degree + 1)]
    if w is not None:
        cols.append(expit((x - c) / w) - 0.5)
    return np.stack(cols, axis=1)


def _robust_fit(X: np.ndarray, y: np.ndarray, sigma: np.ndarray, k: float, iters: int = 4):
    """Huber IRLS; returns ``(coef, sum of rho(r / sigma))``."""
    w = 1.0 / sigma**2
    coef = np.zeros(X.shape[1])
    for _ in range(iters + 1):
        Xw = X * w[:, None]
        G = X.T @ Xw + 1e-10 * np.eye(X.shape[1])
        coef = np.linalg.solve(G, Xw.T @ y)
        z = (y - X @ coef) / sigma
        az = np.maximum(np.abs(z), 1e-12)
        w = np.where(az <= k, 1.0, k / az) / sigma**2
    z = (y - X @ coef) / sigma
    return coef, float(_huber_rho(z, k).sum())


@dataclass(frozen=True)
class _Candidate:
    c: float
    w: float
    lo: int
    hi: int
    score: float


def _bands(x, sigma, prior_w, centers, idx_c, half, min_window_points, degree):
    """Windows ``centers +- half`` (at least ``min_window_points`` each side) gathered into bands
    ``(C, L)``, with the polynomial part of the weighted normal equations."""
    n = x.size
    lo = np.minimum(np.searchsorted(x, centers - half, "left"), idx_c - min_window_points)
    hi = np.maximum(np.searchsorted(x, centers + half, "right"), idx_c + min_window_points)
    lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
    L = int((hi - lo).max())
    idx = lo[:, None] + np.arange(L)[None, :]
    inside = idx < hi[:, None]
    idx = np.minimum(idx, n - 1)
    W = np.where(inside, (prior_w / sigma**2)[idx], 0.0)
    h = np.maximum(centers - x[lo], x[hi - 1] - centers)
    u = (x[idx] - centers[:, None]) / h[:, None]
    P = np.stack([u**d for d in range(degree + 1)], axis=2)  # (C, L, p)
    return lo, hi, idx, W, P


def _scan(x, y, sigma, prior_w, *, widths, centers, idx_c, degree, window, window_widths,
          min_window_points, penalty, min_magnitude, min_amp, excluded, drift):
    """Best (c, w) by weighted least-squares deviance over the grid, vectorised over centres.

    Each centre's window (half-width ``max(window, window_widths * w)``) is gathered into a band
    ``(C, L)``; the polynomial part of the normal equations is shared by all widths with the same
    window, so a width only adds the sigmoid column.
    """
    p = degree + 1
    eye = 1e-10 * np.eye(p + 1)
    sig_c = np.interp(centers, x, sigma)
    amp_c = np.interp(centers, x, min_amp)
    best: _Candidate | None = None
    cache_half = None
    for w in widths:
        half = max(window, window_widths * w)
        if half != cache_half:
            cache_half = half
            lo, hi, idx, W, P = _bands(x, sigma, prior_w, centers, idx_c, half, min_window_points, degree)
            xb, yb = x[idx], y[idx]
            WP = P * W[:, :, None]
            G0 = np.einsum("cli,clj->cij", WP, P)
            b0 = np.einsum("cli,cl->ci", WP, yb)
            coef0 = np.linalg.solve(G0 + eye[:p, :p], b0[:, :, None])[:, :, 0]
            yWy = (W * yb**2).sum(1)
            rss0 = yWy - (coef0 * b0).sum(1)
            n_w = hi - lo
            G1 = np.zeros((centers.size, p + 1, p + 1))
            G1[:, :p, :p] = G0
            b1 = np.zeros((centers.size, p + 1))
            b1[:, :p] = b0
        sg = expit((xb - centers[:, None]) / w) - 0.5
        Ws = W * sg
        cross = np.einsum("cli,cl->ci", P, Ws)
        G1[:, :p, p] = cross
        G1[:, p, :p] = cross
        G1[:, p, p] = (Ws * sg).sum(1)
        b1[:, p] = (Ws * yb).sum(1)
        coef1 = np.linalg.solve(G1 + eye, b1[:, :, None])[:, :, 0]
        rss1 = yWy - (coef1 * b1).sum(1)
        phi = np.maximum(1.0, rss1 / np.maximum(n_w - p - 1, 1))
        dev = (rss0 - rss1) / phi
        A = np.abs(coef1[:, -1])
        complete = (centers - _COMPLETE * w >= x[lo]) & (centers + _COMPLETE * w <= x[hi - 1])
        ok = complete & (dev >= penalty) & (A / sig_c >= min_magnitude) & (A >= amp_c)
        for c_k, w_k, gap_k, kept in excluded:  # too close to an accepted (or rejected) transition
            ok &= np.abs(centers - c_k) > _zone(w, w_k, gap_k, kept)
        if w >= 0.5 * widths[-1]:  # broad shapes where drift was recognised
            for c_k, w_k in drift:
                ok &= np.abs(centers - c_k) > _COMPLETE * (w + w_k)
        if not ok.any():
            continue
        i = int(np.argmax(np.where(ok, dev, -np.inf)))
        if best is None or dev[i] > best.score:
            best = _Candidate(float(centers[i]), float(w), int(lo[i]), int(hi[i]), float(dev[i]))
    return best


def _window(x: np.ndarray, c: float, window: float, min_window_points: int):
    n = x.size
    idx = int(np.searchsorted(x, c, "left"))
    lo = min(int(np.searchsorted(x, c - window, "left")), idx - min_window_points)
    hi = max(int(np.searchsorted(x, c + window, "right")), idx + min_window_points)
    return max(lo, 0), min(hi, n)


def _evidence(xs, ys, ss, c, w, degree, k):
    """Robust deviance difference on one window, deflated by the misfit of the richer model.

    Returns ``(A, D, fitted)``: the sigmoid's amplitude, the evidence and the fitted H1 curve.

    ``D = 2 sum [rho(r0/sigma) - rho(r1/sigma)] / phi`` with
    ``phi = max(1, median((r1/sigma)^2) / 0.455)`` (0.455 is the median of chi-square with one
    degree of freedom): a baseline that cannot follow the drift inflates ``phi`` and so cannot be
    mistaken for a transition.
    """
    h = max(c - xs[0], xs[-1] - c, 1e-12)
    X1 = _design(xs, c, h, degree, w)
    coef1, rho1 = _robust_fit(X1, ys, ss, k)
    _, rho0 = _robust_fit(X1[:, :-1], ys, ss, k)
    z1 = (ys - X1 @ coef1) / ss
    phi = max(1.0, float(np.median(z1**2)) / 0.455)
    return float(coef1[-1]), 2.0 * (rho0 - rho1) / phi, X1 @ coef1


def _refine(x, y, sigma, cand: _Candidate, degree: int, k: float, w_bounds):
    """Continuous refinement of (c, w) on the candidate's window (Huber loss, Nelder-Mead)."""
    xs, ys, ss = x[cand.lo:cand.hi], y[cand.lo:cand.hi], sigma[cand.lo:cand.hi]
    h = max(cand.c - xs[0], xs[-1] - cand.c)
    c_lo, c_hi = xs[0], xs[-1]

    def loss(theta):
        c, logw = theta
        c = min(max(c, c_lo), c_hi)
        w = float(np.clip(np.exp(logw), *w_bounds))
        return _robust_fit(_design(xs, c, h, degree, w), ys, ss, k, iters=2)[1]

    res = minimize(loss, np.array([cand.c, math.log(cand.w)]), method="Nelder-Mead",
                   options={"xatol": 1e-3, "fatol": 1e-3, "maxiter": 120})
    c = float(min(max(res.x[0], c_lo), c_hi))
    w = float(np.clip(np.exp(res.x[1]), *w_bounds))
    return c, w


def detect_transitions(
    steps,
    values,
    *,
    stderr=None,
    log_offset: float = 1.0,
    baseline_degree: int = 2,
    window: float = 1.0,
    window_widths: float = WINDOW_WIDTHS,
    min_window_points: int = 8,
    min_side_points: int = 5,
    min_width: float | None = None,
    max_width: float = MAX_WIDTH,
    n_widths: int = 8,
    max_centers: int = 150,
    penalty: float | None = None,
    penalty_factor: float = 3.5,
    min_magnitude: float = 4.0,
    min_change: float = MIN_CHANGE,
    noise_floor: float = 0.01,
    huber_k: float = 2.0,
    max_transitions: int = 5,
    metric: str | None = None,
) -> list[Transition]:
    """Find sigmoid/step transitions in a training curve, robustly and without firing on drift.

    The result does not depend on the units of ``values``: they are centred and scaled by their
    range first (``values * 10**k + b`` gives the same flags for any ``k`` and ``b``).

    Args:
        steps: Training steps (any order; sorted internally; distinct).
        values: Metric values, finite.
        stderr: Optional per-point standard errors (e.g. of the LLC); the noise scale becomes
            ``c * stderr`` with ``c`` fitted robustly, and a transition must also be at least
            ``min_magnitude`` stated standard errors high.
        log_offset: ``x = log(step + log_offset)``; the default 1 allows step 0.
        baseline_degree: Degree of the local polynomial baseline in ``x`` (drift model).
        window: Smallest half-width of the fitting window around each candidate centre, in log-step
            units (default 1.0: a factor e each way), widened to ``min_window_points``.
        window_widths: The window's half-width is at least this many sigmoid widths, so a broad
            transition has baseline on both sides of it (default 6).
        min_window_points: Minimum points on each side of a centre in its window.
        min_side_points: Minimum points on each side of a centre in the whole curve (lowered to
            ``n // 3`` for curves shorter than ``3 * min_side_points``, at least 3).
        min_width: Smallest logistic width scanned, in log-step units; default
            ``0.1 * median spacing`` (a step sharper than the sampling).
        max_width: Largest width scanned (default 0.4: a 10-90% rise over a factor ~5.8 in
            steps). Slower changes count as drift.
        n_widths: Number of widths scanned (geometric grid).
        max_centers: Centres scanned per width (all midpoints if fewer, else a uniform grid in x).
        penalty: Threshold on the evidence ``D``; default ``penalty_factor * log(n)``.
        penalty_factor: See ``penalty`` (BIC with 3 extra parameters would be 3; 3.5 leaves room
            for the scan over centres and widths).
        min_magnitude: Minimum ``|A| / sigma`` of a reported transition.
        min_change: Minimum ``|A|`` as a fraction of the curve's range (the range of its running
            median of three, so one outlier does not set it). This is what keeps smooth,
            almost noiseless curves (head scores, an ICL score) from being flagged for negligible
            moves: their noise scale is ~0, so ``min_magnitude`` alone would pass any bend.
            The data must also move by this much between the samples bracketing the reported
            ``[start, end]`` (as :func:`~devinterp.analyses.transitions.online.relative_move`
            measures it). Default 0.1 (10% of the range); 0 disables it.
        noise_floor: Noise sd is at least this fraction of the value range (noiseless curves).
        huber_k: Huber threshold in noise sd for the robust fit and evidence.
        max_transitions: Stop after this many.
        metric: Name stored in each :class:`Transition`.

    Returns:
        Transitions sorted by step.

    Raises:
        InvalidInputError: bad input (lengths, NaNs, duplicate steps, too few points) or parameters.
    """
    if baseline_degree < 0 or baseline_degree > 5:
        raise InvalidInputError(f"baseline_degree must be in 0..5, got {baseline_degree}")
    if window <= 0 or window_widths < 0 or max_width <= 0 or n_widths < 1 or max_centers < 1:
        raise InvalidInputError("window, max_width, n_widths, max_centers must be > 0 and window_widths >= 0")
    if min_side_points < 1 or min_window_points < min_side_points:
        raise InvalidInputError(
            f"need 1 <= min_side_points <= min_window_points, got {min_side_points}, {min_window_points}"
        )
    if huber_k <= 0 or min_magnitude < 0 or noise_floor < 0 or penalty_factor < 0:
        raise InvalidInputError("huber_k must be > 0; min_magnitude, noise_floor, penalty_factor >= 0")
    if not 0 <= min_change < 1:
        raise InvalidInputError(f"min_change is a fraction of the curve's range in [0, 1), got {min_change}")
    min_points = max(min(2 * min_side_points, 6), baseline_degree + 3, 6)
    series = validate_series(steps, values, stderr, log_offset=log_offset, min_points=min_points)
    return _detect(series, baseline_degree=baseline_degree, window=window,
                   window_widths=window_widths,
                   min_window_points=min_window_points,
                   min_side_points=max(3, min(min_side_points, series.n // 3)),
                   min_width=min_width, max_width=max_width, n_widths=n_widths,
                   max_centers=max_centers, penalty=penalty, penalty_factor=penalty_factor,
                   min_magnitude=min_magnitude, min_change=min_change, noise_floor=noise_floor,
                   huber_k=huber_k, max_transitions=max_transitions, metric=metric)


def curve_range(values, stderr=None) -> float:
    """The range of a curve as :func:`detect_transitions` measures it for ``min_change``.

    Without ``stderr``: max - min of the running median of three (end points kept), so a single
    outlier does not set it. With ``stderr``: the range the curve spans beyond its errors,
    ``max(v - 2 stderr) - min(v + 2 stderr)`` (at least 0), so uncertain points do not widen it.
    """
    v = np.asarray(values, dtype=float)
    if stderr is not None:
        e = np.asarray(stderr, dtype=float)
        return float(max((v - 2 * e).max() - (v + 2 * e).min(), 0.0)) if v.size else 0.0
    if v.size < 3:
        return float(np.ptp(v)) if v.size else 0.0
    med = np.median(np.stack([v[:-2], v[1:-1], v[2:]]), axis=0)
    smooth = np.concatenate([v[:1], med, v[-1:]])
    return float(np.ptp(smooth))


def _standardize(series: Series) -> tuple[Series, float, float]:
    """Centre and scale the values (and stderr) by the median and the range: unit-free detection."""
    v = series.values
    center = float(np.median(v))
    scale = float(np.ptp(v))
    if not np.isfinite(scale) or scale <= 0:
        scale = max(abs(center), 1.0) if np.isfinite(center) else 1.0
    e = None if series.stderr is None else series.stderr / scale
    return replace(series, values=(v - center) / scale, stderr=e), center, scale


def _detect(series: Series, *, baseline_degree, window, window_widths, min_window_points,
            min_side_points, min_width, max_width, n_widths, max_centers, penalty, penalty_factor,
            min_magnitude, min_change, noise_floor, huber_k, max_transitions, metric) -> list[Transition]:
    series, _, scale = _standardize(series)
    x, n = series.x, series.n
    y = series.values.copy()
    y0 = series.values.copy()  # the curve itself; y loses each transition once it is found
    sigma, _ = noise_scale(series, noise_floor=noise_floor)
    # the smallest |A| allowed, per point: a fraction of the range, and min_magnitude stated stderr
    min_move = min_change * curve_range(y, series.stderr)
    min_amp = np.full(n, min_move)
    if series.stderr is not None:
        min_amp = np.maximum(min_amp, min_magnitude * series.stderr)
    dx = np.diff(x)
    w_min = 0.1 * float(np.median(dx)) if min_width is None else float(min_width)
    if w_min <= 0:
        raise InvalidInputError(f"min_width must be > 0, got {min_width}")
    w_min = min(w_min, max_width)
    widths = np.geomspace(w_min, max_width, n_widths) if n_widths > 1 else np.array([max_width])
    pen = penalty_factor * math.log(n) if penalty is None else float(penalty)

    # candidate centres: between point idx-1 and idx, with min_side_points on each side
    first, last = min_side_points, n - min_side_points
    if last < first:
        return []
    mids = 0.5 * (x[first - 1:last] + x[first:last + 1])
    centers = mids if mids.size <= max_centers else np.linspace(mids[0], mids[-1], max_centers)
    idx_c = np.searchsorted(x, centers, "left")

    # prior robustness weights from the local (neighbour) residuals
    r, a, b = local_residuals(x, y)
    z = np.zeros(n)
    z[1:-1] = np.abs(r) / (sigma[1:-1] * np.sqrt(1 + a**2 + b**2))
    prior_w = np.where(z <= 2 * huber_k, 1.0, 2 * huber_k / np.maximum(z, 1e-12))

    def to_x(v: float) -> float:  # x of the reported step (rounded like Transition.start / end)
        return math.log(series.to_step(v) + series.log_offset)

    found: list[Transition] = []
    excluded: list[tuple[float, float, float, bool]] = []  # (c, w, local gap, accepted)
    drift: list[tuple[float, float]] = []  # (c, w) of broad shapes recognised as drift

    def set_aside(cand: _Candidate, broad: bool) -> None:
        """A candidate not reported: a broad one is drift (narrower transitions there remain
        possible), any other blocks its zone (:func:`_zone`)."""
        if broad:
            drift.append((cand.c, cand.w))
        else:
            excluded.append((cand.c, cand.w, _gap_at(x, cand.c), False))

    for _ in range(4 * max_transitions):
        if len(found) >= max_transitions:
            break
        cand = _scan(x, y, sigma, prior_w, widths=widths, centers=centers, idx_c=idx_c,
                     degree=baseline_degree, window=window, window_widths=window_widths,
                     min_window_points=min_window_points, penalty=pen,
                     min_magnitude=min_magnitude, min_amp=min_amp, excluded=excluded, drift=drift)
        if cand is None:
            break
        c, w = _refine(x, y, sigma, cand, baseline_degree, huber_k, (w_min, _DRIFT_WIDTH * max_width))
        lo, hi = cand.lo, cand.hi
        broad = False  # widest on the grid and wider still when free: drift, unless the grid's
        if w > max_width:  # own (c, w) passes every test (a broad transition over drift)
            broad = cand.w >= widths[-1]
            if broad and w > _BROAD_SLACK * max_width:  # clearly wider when free: drift
                set_aside(cand, broad)
                continue
            c, w = cand.c, cand.w
        if c - _COMPLETE * w < x[lo] or c + _COMPLETE * w > x[hi - 1]:
            c, w = cand.c, cand.w
        if not x[lo] + _COMPLETE * w <= c <= x[hi - 1] - _COMPLETE * w:  # not inside its own window
            set_aside(cand, broad)
            continue
        # the refined (c, w); else the grid's, when the fitted curve itself moves by the minimum
        # change across it (the refinement can slide to a narrower, smaller local fit)
        tries = [(c, w, 0.0)] + ([(cand.c, cand.w, min_move)] if (c, w) != (cand.c, cand.w) else [])
        for c, w, need_move in tries:
            fit = _judge(x, y, y0, sigma, min_amp, lo, hi, c, w, baseline_degree, huber_k, to_x)
            clash = any(abs(c - c_k) <= _zone(w, w_k, gap_k, kept) for c_k, w_k, gap_k, kept in excluded)
            if (fit.dev >= pen and fit.mag >= min_magnitude and not clash and fit.plain
                    and abs(fit.move) >= need_move):
                break
        else:
            set_aside(cand, broad)
            continue
        amp, dev, mag, noise_c, half, gap = fit.amp, fit.dev, fit.mag, fit.noise, fit.half, fit.gap
        found.append(Transition(
            step=series.to_step(c), start=series.to_step(c - half), end=series.to_step(c + half),
            direction="rise" if amp > 0 else "fall",
            kind="step" if 2 * half < gap else "sigmoid",
            magnitude=float(mag), confidence=float(expit((dev - pen) / 2.0)), method=METHOD,
            amplitude=float(amp * scale), width=float(w), evidence=float(dev), penalty=float(pen),
            noise=noise_c * scale, n_window=hi - lo,
            window_start=float(series.steps[lo]), window_end=float(series.steps[hi - 1]),
            metric=metric,
        ))
        y = y - amp * (expit((x - c) / w) - 0.5)
        excluded.append((c, w, gap, True))
    return sorted(found, key=lambda t: t.step)


@dataclass(frozen=True)
class _Fit:
    amp: float
    dev: float
    mag: float
    noise: float
    half: float
    gap: float
    plain: bool  # large enough (min_change, stated stderr) and the curve moves the sigmoid's way
    move: float  # the fitted curve's move between the samples bracketing the 10-90% span


def _judge(x, y, y0, sigma, min_amp, lo, hi, c, w, degree, k, to_x) -> _Fit:
    """Evidence and size of the sigmoid ``(c, w)`` on the window ``[lo, hi)``.

    ``plain`` requires ``|A|`` at least the minimum change at ``c`` and the fitted curve (baseline
    plus sigmoid) to move in the sigmoid's direction between the samples bracketing its 10-90%
    span: a "fall" that the fitted curve in fact climbs through is a baseline artefact (e.g. a
    steep polynomial matching a change that the window cuts off at its edge), not a transition.
    The move may fall short of the minimum change by at most ``_MOVE_SLACK`` noise sd (drift
    opposing a real, noisy transition makes it small; a smooth curve's bend has no such excuse),
    and the data ``y0`` (the curve before earlier transitions were subtracted) must move its way
    by at least the minimum change between the same samples (no noise allowance: a flag never
    marks a move of the data smaller than ``min_change`` of the range).
    """
    amp, dev, fitted = _evidence(x[lo:hi], y[lo:hi], sigma[lo:hi], c, w, degree, k)
    noise_c = float(np.interp(c, x, sigma))
    half = 0.5 * _SPAN_10_90 * w
    i = max(int(np.searchsorted(x, c - half, "right")) - 1, lo) - lo
    j = min(int(np.searchsorted(x, c + half, "left")), hi - 1) - lo
    move = float(fitted[j] - fitted[i])
    # the curve must move the sigmoid's way, and not by confidently less than the minimum change:
    # drift opposing a noisy transition can shrink its move, but on an almost noiseless curve a
    # sigmoid whose fitted move is small is a bend of the baseline, not a transition
    need = float(np.interp(c, x, min_amp))
    shortfall = need - move * np.sign(amp)
    # the data themselves (before earlier transitions were subtracted) must move the sigmoid's way
    # across its span by the minimum change, between the same two samples that
    # :func:`~devinterp.analyses.transitions.online.relative_move` reads: a sigmoid fitted where
    # the curve stands still (a flat plateau, the residue next to a large change, a bend that the
    # baseline cancels) is a misfit, not a transition
    ri, rj = bracket(x, to_x(c - half), to_x(c + half))
    raw = float(y0[rj] - y0[ri]) * np.sign(amp)
    plain = (abs(amp) >= need and move * amp > 0
             and shortfall <= _MOVE_SLACK * noise_c and raw >= need)
    return _Fit(amp, dev, abs(amp) / noise_c, noise_c, half, _gap_at(x, c), plain, move)


def bracket(x: np.ndarray, xa: float, xb: float) -> tuple[int, int]:
    """The samples of the sorted ``x`` bracketing ``[xa, xb]``: the last at or before ``xa`` and
    the first at or after ``xb`` (for a step sharper than the sampling, at a sample: the samples
    either side of it). The detector's data-move rule and
    :func:`~devinterp.analyses.transitions.online.relative_move` both read these."""
    n = x.size
    i = max(int(np.searchsorted(x, xa, "right")) - 1, 0)
    j = min(int(np.searchsorted(x, xb, "left")), n - 1)
    if j <= i:  # a step sharper than the sampling, at a sample: the samples either side of it
        i, j = max(i - 1, 0), min(i + 1, n - 1)
    return i, j


def _zone(w: float, w_k: float, gap_k: float, accepted: bool) -> float:
    """How close (in x) a candidate of width ``w`` may not come to an earlier one ``(w_k, gap_k)``.

    An accepted transition owns its whole span: no other may overlap it (``2.5 (w + w_k)``). A
    rejected candidate blocks only shapes of its own scale or broader near it (``2.5 min(w, w_k)``),
    and clearly narrower ones (``w < w_k / 1.5``) only at its own centre, so a misfit (e.g. a broad
    sigmoid straddling drift and a transition) does not hide the transition next to it.
    """
    if accepted:
        return _COMPLETE * (w + w_k) + 2.0 * gap_k
    if w < w_k / _NARROWER:
        return 2.0 * gap_k
    return _COMPLETE * min(w, w_k) + 2.0 * gap_k


def _gap_at(x: np.ndarray, c: float) -> float:
    i = int(np.clip(np.searchsorted(x, c), 1, x.size - 1))
    return float(x[i] - x[i - 1])
