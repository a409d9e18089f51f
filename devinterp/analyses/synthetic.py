"""Seeded synthetic training curves with known transitions, for tests and benchmarks.

A curve is ``drift(x) + sum_k A_k * sigmoid((x - c_k) / w_k) + noise`` on a log-spaced, jittered
step grid, with ``x = log(step + 1)``:

- steps: ``n_points`` values from ``10`` to ``10**U(3.5, 5.5)``, geometric with random jitter
  (irregular spacing), rounded to distinct integers where the grid allows, else kept as floats;
- drift (noise-sd units): one of power-law decay ``D (t+1)^-alpha`` (loss-like), linear in log step,
  quadratic in log step, or a very broad tanh (width >= 25% of the log range); total size
  ``|D| ~ U(0, drift_max)``;
- transitions: ``0..2`` sigmoids, amplitude ``U(6, 14)`` noise sd with random sign, width
  log-uniform in ``[0.01, 0.3]`` log-step units (so from sharper than the sampling to a factor ~3.7
  in steps for 10-90%), midpoints in the middle 70% of the log range (with at least
  ``min_edge_points`` points outside), two midpoints at least ``0.2`` of the range and
  ``6 * max(w)`` apart;
- noise: Gaussian, or Student-t with ``df`` degrees of freedom scaled to unit sd;
- finally the whole curve is scaled by a random factor and shifted (detectors must be scale-free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

DRIFTS = ("power", "linear", "quadratic", "broad_tanh")
NOISES = ("gaussian", "student_t", "laplace")


@dataclass(frozen=True)
class SyntheticCurve:
    """A generated curve and its ground truth.

    Attributes:
        steps: Training steps (sorted, distinct).
        values: Observed values.
        midpoints: True transition midpoints, as steps.
        widths: True logistic widths in log-step units.
        amplitudes: True signed amplitudes in noise sd.
        noise_sd: Noise sd in the units of ``values``.
        noise: ``"gaussian"``, ``"student_t"`` or ``"laplace"``.
        drift: The drift family.
        clean: The noise-free values (drift plus transitions, same scale and offset as ``values``).
    """

    steps: np.ndarray
    values: np.ndarray
    midpoints: tuple[float, ...]
    widths: tuple[float, ...]
    amplitudes: tuple[float, ...]
    noise_sd: float
    noise: str
    drift: str
    clean: np.ndarray | None = None


def log_steps(rng: np.random.Generator, n_points: int, start: float, stop: float,
              jitter: float = 0.4) -> np.ndarray:
    """Geometric grid with each point moved by up to ``jitter`` of a spacing; ints when distinct."""
    x = np.linspace(math.log(start), math.log(stop), n_points)
    dx = x[1] - x[0]
    x[1:-1] += rng.uniform(-jitter, jitter, n_points - 2) * dx
    steps = np.exp(np.sort(x))
    rounded = np.round(steps)
    if np.all(np.diff(rounded) > 0):
        return rounded
    return steps


def max_transitions_for(n_points: int) -> int:
    """How many transitions a curve of ``n_points`` can hold with enough points around each."""
    return 0 if n_points < 10 else 1 if n_points < 30 else 2 if n_points < 80 else 3


def synthetic_curve(
    rng: np.random.Generator,
    *,
    n_points: int,
    n_transitions: int,
    noise: str = "gaussian",
    df: float = 3.0,
    drift: str | None = None,
    drift_max: float = 40.0,
    amplitude_range: tuple[float, float] = (6.0, 14.0),
    width_range: tuple[float, float] = (0.02, 0.3),
    min_edge_points: int = 6,
) -> SyntheticCurve:
    """Draw one curve (see the module docstring). Same generator state, same curve.

    ``n_transitions`` is capped by :func:`max_transitions_for` (short curves hold fewer); at most
    ``n_points // 3`` points (and ``min_edge_points``) lie before the first and after the last midpoint.
    """
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if not 0 <= n_transitions <= 3:
        raise ValueError(f"n_transitions must be in 0..3, got {n_transitions}")
    if n_points < 10:
        raise ValueError(f"n_points must be >= 10, got {n_points}")
    n_transitions = min(n_transitions, max_transitions_for(n_points))
    stop = 10 ** rng.uniform(3.5, 5.5)
    steps = log_steps(rng, n_points, 10.0, stop)
    x = np.log(steps + 1.0)
    x0, x1 = x[0], x[-1]
    span = x1 - x0
    t = (x - x0) / span
    drift = drift or DRIFTS[rng.integers(len(DRIFTS))]
    D = rng.uniform(0, drift_max) * rng.choice([-1.0, 1.0])
    if drift == "power":
        alpha = rng.uniform(0.2, 1.0)
        base = np.exp(-alpha * (x - x0))
        base = D * (base - base[-1]) / (base[0] - base[-1])
    elif drift == "linear":
        base = D * t
    elif drift == "quadratic":
        base = D * (t - rng.uniform(0, 1)) ** 2
    elif drift == "broad_tanh":
        base = D * np.tanh((t - rng.uniform(0.2, 0.8)) / rng.uniform(0.25, 0.6))
    else:
        raise ValueError(f"drift must be one of {DRIFTS}, got {drift!r}")
    widths = np.exp(rng.uniform(math.log(width_range[0]), math.log(width_range[1]), n_transitions))
    edge = min(min_edge_points, n_points // 3)
    lo_x = max(x0 + 0.15 * span, x[edge])
    hi_x = min(x1 - 0.15 * span, x[-edge - 1])
    centers: list[float] = []
    for _ in range(1000):
        centers = sorted(rng.uniform(lo_x, hi_x, n_transitions).tolist())
        gaps = np.diff(centers)
        need = max(0.15 * span, 6 * float(widths.max())) if n_transitions else 0.0
        if n_transitions < 2 or gaps.min() >= need:
            break
    else:
        # rare (short log-span, broad widths): place them evenly and narrow the widths to fit
        centers = np.linspace(lo_x, hi_x, n_transitions + 2)[1:-1].tolist()
        gap = (hi_x - lo_x) / (n_transitions + 1)
        if gap < 0.15 * span:
            raise ValueError(f"cannot place {n_transitions} transitions {need:.2f} apart on this grid")
        widths = np.minimum(widths, gap / 6)
    amps = rng.uniform(*amplitude_range, n_transitions) * rng.choice([-1.0, 1.0], n_transitions)
    y = base.copy()
    for c, w, a in zip(centers, widths, amps, strict=True):
        y += a * expit((x - c) / w)
    if noise == "gaussian":
        eps = rng.standard_normal(n_points)
    elif noise == "student_t":
        eps = rng.standard_t(df, n_points) / math.sqrt(df / (df - 2))
    else:  # laplace, unit sd
        eps = rng.laplace(0.0, 1.0 / math.sqrt(2.0), n_points)
    clean = y.copy()
    y += eps
    scale, shift = 10 ** rng.uniform(-2, 2), rng.normal(0, 5)
    return SyntheticCurve(
        steps=steps, values=shift + scale * y, clean=shift + scale * clean,
        midpoints=tuple(float(np.exp(c) - 1.0) for c in centers),
        widths=tuple(float(w) for w in widths), amplitudes=tuple(float(a) for a in amps),
        noise_sd=float(scale), noise=noise, drift=drift,
    )


def curve_suite(seed: int, n_curves: int, *, min_points: int = 10, max_points: int = 2000,
                noises: tuple[str, ...] = NOISES, max_transitions: int = 3) -> list[SyntheticCurve]:
    """``n_curves`` curves: point counts log-uniform in ``[min_points, max_points]``, noise kinds and
    transition counts ``0..max_transitions`` cycled evenly (a count is capped by the curve's
    length: :func:`max_transitions_for`)."""
    rng = np.random.default_rng(seed)
    out = []
    k = max_transitions + 1
    for i in range(n_curves):
        n = int(round(math.exp(rng.uniform(math.log(min_points), math.log(max_points)))))
        out.append(synthetic_curve(rng, n_points=n, n_transitions=i % k,
                                   noise=noises[(i // k) % len(noises)]))
    return out


@dataclass(frozen=True)
class Score:
    """Matching of flags to true transitions over a suite."""

    true_positives: int
    false_positives: int
    false_negatives: int
    drift_only_curves: int
    drift_only_flags: int

    @property
    def recall(self) -> float:
        d = self.true_positives + self.false_negatives
        return self.true_positives / d if d else 1.0

    @property
    def precision(self) -> float:
        d = self.true_positives + self.false_positives
        return self.true_positives / d if d else 1.0

    @property
    def false_flags_per_drift_curve(self) -> float:
        return self.drift_only_flags / self.drift_only_curves if self.drift_only_curves else 0.0


def hit_tolerance(width: float) -> float:
    """A flag hits a true transition when ``|log(flag+1) - log(mid+1)| <= log(1.5) + width``."""
    return math.log(1.5) + width


def clean_move(curve: SyntheticCurve, k: int) -> float:
    """How far the noise-free curve moves across true transition ``k``, as a fraction of its range.

    The move is read like :func:`~devinterp.analyses.transitions.online.relative_move` reads a
    flag's: between the samples bracketing the transition's 10-90% span, signed so that a move the
    transition's way is positive. A transition whose drift cancels it across its own span (a
    plateau in a drifting curve) moves less than the detector's ``min_change`` (0.1 of the range):
    a flag there would be a "tiny" flag by the real-run rule, so the detector does not report it.
    """
    from devinterp.analyses.transitions.detect import bracket

    x = np.log(curve.steps + 1.0)
    c = math.log(curve.midpoints[k] + 1.0)
    half = math.log(9.0) * curve.widths[k]
    i, j = bracket(x, c - half, c + half)
    span = float(np.ptp(curve.clean))
    sign = math.copysign(1.0, curve.amplitudes[k])  # the scale factor is positive
    return float((curve.clean[j] - curve.clean[i]) * sign / span) if span > 0 else 0.0


def match_detail(curve: SyntheticCurve, flagged_steps) -> tuple[tuple[bool, ...], int]:
    """Greedy one-to-one matching (closest first): which true transitions were hit, and the number
    of flags that hit none (false flags)."""
    flags = [math.log(s + 1.0) for s in flagged_steps]
    truth = [math.log(m + 1.0) for m in curve.midpoints]
    pairs = sorted(
        (abs(f - t), i, j) for i, f in enumerate(flags) for j, t in enumerate(truth)
        if abs(f - t) <= hit_tolerance(curve.widths[j])
    )
    used_f, used_t = set(), set()
    for _, i, j in pairs:
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    return tuple(j in used_t for j in range(len(truth))), len(flags) - len(used_f)


def match(curve: SyntheticCurve, flagged_steps) -> tuple[int, int, int]:
    """Greedy one-to-one matching (closest first): ``(tp, fp, fn)`` for one curve."""
    hits, fp = match_detail(curve, flagged_steps)
    tp = sum(hits)
    return tp, fp, len(hits) - tp


def score(curves, flagged) -> Score:
    """Score a list of curves against the flagged steps for each."""
    tp = fp = fn = dc = df_ = 0
    for curve, steps in zip(curves, flagged, strict=True):
        a, b, c = match(curve, steps)
        tp, fp, fn = tp + a, fp + b, fn + c
        if not curve.midpoints:
            dc += 1
            df_ += len(steps)
    return Score(tp, fp, fn, dc, df_)
