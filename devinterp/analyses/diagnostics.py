"""MCMC diagnostics of recorded traces: effective sample size and split R-hat (pure numpy).

Both follow Gelman et al., "Bayesian Data Analysis" (3rd ed., §11.4-11.5): the ESS sums the
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
