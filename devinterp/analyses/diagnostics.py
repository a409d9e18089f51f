"""MCMC diagnostics (pure numpy): effective sample size, split R-hat, trend, and the predicted
relaxation of slow directions from a curvature spectrum.

ESS and R-hat follow Gelman et al., "Bayesian Data Analysis" (3rd ed., §11.4-11.5): the ESS sums the
autocorrelations up to Geyer's initial positive sequence; R-hat is the split-chain potential scale
reduction factor.
"""

from __future__ import annotations

import numpy as np


def autocorrelation(x: np.ndarray) -> np.ndarray:
    """Autocorrelation of a 1-d series at every lag (FFT, biased normalisation)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    centred = x - x.mean()
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centred, size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), size)[:n] / n
    if acov[0] <= 0:
        return np.concatenate([[1.0], np.zeros(n - 1)])
    return acov / acov[0]


def effective_sample_size(x: np.ndarray) -> float:
    """ESS of one chain: ``n / (1 + 2 Σ ρ_t)`` summed over Geyer's initial positive sequence."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 4:
        return float(n)
    rho = autocorrelation(x)
    tau = -1.0
    for t in range(0, n - 1, 2):
        pair = rho[t] + rho[t + 1]
        if pair <= 0:
            break
        tau += 2 * pair
    tau = max(tau, 1.0 / np.log10(max(n, 10)))
    return float(min(n / tau, n * np.log10(max(n, 10))))


def split_rhat(traces: np.ndarray) -> float:
    """Split-chain R-hat of ``(chains, draws)`` traces (NaN with fewer than 4 draws)."""
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 2 or traces.shape[1] < 4:
        return float("nan")
    half = traces.shape[1] // 2
    parts = np.concatenate([traces[:, :half], traces[:, -half:]], axis=0)
    n = parts.shape[1]
    within = parts.var(axis=1, ddof=1).mean()
    between = n * parts.mean(axis=1).var(ddof=1)
    if within <= 0:
        return float("nan") if between <= 0 else float("inf")
    var_plus = (n - 1) / n * within + between / n
    return float(np.sqrt(var_plus / within))


def trend_zscore(traces: np.ndarray) -> float:
    """How many standard errors the mean of the second half of the draws differs from the first.

    Standard errors use each half's effective sample size, so autocorrelated noise does not count
    as a trend. Pooled over chains.
    """
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 2 or traces.shape[1] < 8:
        return 0.0
    half = traces.shape[1] // 2
    first, second = traces[:, :half], traces[:, -half:]
    diff = second.mean() - first.mean()
    var = 0.0
    for part in (first, second):
        for row in part:
            var += row.var(ddof=1) / max(effective_sample_size(row), 1.0)
    var /= traces.shape[0] ** 2
    if var <= 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / np.sqrt(var))


def relaxed_fractions(curvatures: np.ndarray, step_size: float, localization: float,
                      num_burnin: int, num_draws: int) -> np.ndarray:
    """Per direction, the fraction of its equilibrium variance an SGLD chain started at w* has
    reached, averaged over the draws (steps ``num_burnin … num_burnin + num_draws − 1``).

    In a quadratic direction of curvature ``h`` (of ``nβ·L``) the Euler–Maruyama chain's variance
    after ``t`` steps is ``σ²_∞·(1 − ρ^{2t})`` with ``ρ = 1 − ε(h + γ)/2``: a direction with
    ``ε(h + γ)·t ≲ 1`` has not relaxed yet.
    """
    a = np.asarray(curvatures, dtype=np.float64) + localization
    rho = np.clip(1.0 - step_size * a / 2.0, -1.0, 1.0)
    t0, t1 = int(num_burnin), int(num_burnin) + max(int(num_draws), 1)
    r2 = rho ** 2
    # mean over t in [t0, t1) of r2**t, in closed form (a geometric series)
    with np.errstate(divide="ignore", invalid="ignore"):
        geo = np.where(np.abs(1.0 - r2) > 1e-12,
                       (r2 ** t0 - r2 ** t1) / ((1.0 - r2) * (t1 - t0)), 1.0)
    return 1.0 - geo


def relaxation_deficit(curvatures: np.ndarray, step_size: float, localization: float,
                       num_burnin: int, num_draws: int, weights: np.ndarray | None = None
                       ) -> tuple[float, float]:
    """How far below its equilibrium the draws' λ̂ is predicted to read, from the spectrum.

    Args:
        curvatures: eigenvalues of ``nβ·∇²L_n(w*)`` (negative ones count as 0).
        step_size, localization, num_burnin, num_draws: the chains' settings.
        weights: how many directions each curvature stands for (a quadrature of the spectral
            density, e.g. :func:`devinterp.analyses.relaxation.lanczos_spectrum`); 1 each
            when None.

    Returns:
        ``(deficit, equilibrium)``: the quadratic (Laplace) equilibrium
        ``Σ ½·h/(h + γ)`` and the fraction of it the draws miss, ``1 − Σ ½·h/(h+γ)·f_h /
        equilibrium`` with ``f_h`` from :func:`relaxed_fractions`. A prediction for the
        directions the quadratic model sees; the singular (flat) directions are not in it.
    """
    h = np.clip(np.asarray(curvatures, dtype=np.float64), 0.0, None)
    weight = 0.5 * h / (h + localization)
    if weights is not None:
        weight = weight * np.asarray(weights, dtype=np.float64)
    eq = float(weight.sum())
    if eq <= 0:
        return 0.0, 0.0
    frac = relaxed_fractions(h, step_size, localization, num_burnin, num_draws)
    return float(1.0 - (weight * frac).sum() / eq), eq


def steps_to_relax(curvatures: np.ndarray, step_size: float, localization: float, *,
                   tolerance: float = 0.05, burnin_fraction: float = 0.5,
                   max_steps: int = 10_000_000, weights: np.ndarray | None = None) -> int:
    """Chain length (burn-in + draws, burn-in ``burnin_fraction`` of it) whose predicted
    :func:`relaxation_deficit` is at most ``tolerance`` (``max_steps`` when none is)."""
    def deficit(total: int) -> float:
        burn = int(total * burnin_fraction)
        return relaxation_deficit(curvatures, step_size, localization, burn, total - burn,
                                  weights)[0]

    lo, hi = 1, 2
    while deficit(hi) > tolerance:
        lo, hi = hi, hi * 2
        if hi >= max_steps:
            return max_steps
    while hi - lo > max(1, hi // 100):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if deficit(mid) <= tolerance else (mid, hi)
    return hi
