"""Will the chains relax? The curvature spectrum of a small model at w*, and the check built on it.

SGLD's step size is set by the *largest* curvature ``h_max`` of ``U = nβ·L_n + γ/2‖w − w*‖²``
(stability: ``ε·h_max < 4``; the calibration takes ``ε·h_max`` = 0.5). A direction of curvature
``h`` relaxes in ``~1/(ε(h + γ))`` steps, i.e. ``~h_max/(h + γ)`` steps at that ε. When the
spectrum spans three or four decades (a deep network at an ill-conditioned teacher), the
low-curvature directions that still count towards λ (``h ≳ γ``) need tens of thousands of steps:
chains within the default budget stop before they relax and λ̂ reads low, however the budget
is split. Nothing in the loss trace shows it within such a budget (the slow rise is smaller
than its noise), so the check reads the spectrum instead: for a model of at most
:data:`MAX_PARAMS` sampled weights the Hessian is built from ``D`` finite-difference
Hessian-vector products (``2·D`` model evaluations on ``num_samples`` samples), and
:func:`devinterp.analyses.diagnostics.relaxation_deficit` predicts the fraction of the quadratic
equilibrium the draws miss. Larger models (up to :data:`LANCZOS_MAX_PARAMS` sampled weights) get
the same check from a matrix-free estimate of the spectral density: :func:`lanczos_spectrum`
(stochastic Lanczos quadrature, :data:`LANCZOS_STEPS` finite-difference Hessian-vector products
from one random probe, ``2·LANCZOS_STEPS`` model evaluations whatever the size). See
docs/calibration.md, "Slow directions".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from devinterp.analyses import diagnostics as diag
from devinterp.analyses.sampling import SamplingTarget

#: Build the spectrum only for models with at most this many sampled weights.
MAX_PARAMS = 256
#: ... and only when it costs at most this fraction of the estimate's budget.
MAX_BUDGET_SHARE = 0.12
#: Warn when the draws are predicted to miss more than this fraction of the equilibrium λ̂.
DEFICIT_WARN = 0.2
#: The deficit the suggested budget aims for.
DEFICIT_AIM = 0.05


#: Lanczos steps of the matrix-free spectrum of models with more than :data:`MAX_PARAMS`
#: sampled weights (two model evaluations each). The Gauss quadrature must resolve the mass of
#: the flat (null) directions at 0 from the slow ones just above it: on deep linear networks
#: 40 steps put a node of the null mass at h ~ 50 and read the deficit twice too high, 100
#: steps read it within ~10% of the full spectrum's (docs/calibration.md, "Slow directions").
LANCZOS_STEPS = 100
#: ... up to this many sampled weights: the Krylov basis (LANCZOS_STEPS + 1 float64 vectors,
#: ≤ 53 MB here) is kept for full re-orthogonalization, and above this size it would exceed
#: the estimator's memory bound of (chains + 2) × the parameters many times over.
LANCZOS_MAX_PARAMS = 65_536


#: Samples the spectrum's gradients are taken on (the first ones of the data).
SPECTRUM_SAMPLES = 512


def spectrum_cost(target: SamplingTarget) -> int:
    """Model evaluations the spectrum of ``target`` costs (:func:`hessian_eigenvalues` up to
    :data:`MAX_PARAMS` sampled weights, :func:`lanczos_spectrum` above), in the budget's unit:
    one pass on one minibatch. A gradient on :data:`SPECTRUM_SAMPLES` samples costs as many
    minibatch passes as it holds minibatches (a 16-sample minibatch: 32 of them)."""
    samples = min(SPECTRUM_SAMPLES, int(target.n))
    batches = math.ceil(samples / max(min(int(target.batch_size), samples), 1))
    return spectrum_cost_of(int(target.num_selected), batches)


def spectrum_cost_of(num_params: int, batches: int = 1) -> int:
    """Model evaluations of the spectrum of ``num_params`` sampled weights (two gradients per
    column of the full Hessian up to :data:`MAX_PARAMS`, two per Lanczos step above), each
    gradient on ``batches`` minibatches' worth of samples."""
    if num_params > MAX_PARAMS:
        return 2 * min(LANCZOS_STEPS, int(num_params)) * int(batches)
    return 2 * int(num_params) * int(batches)


def lanczos_spectrum(target: SamplingTarget, *, num_steps: int = LANCZOS_STEPS, seed: int = 0,
                     num_samples: int = SPECTRUM_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Matrix-free spectral density of ``∇²L_n(w*)`` over the sampled weights.

    Stochastic Lanczos quadrature with one Rademacher probe: ``num_steps`` Lanczos steps (full
    re-orthogonalization, float64) on central-difference Hessian-vector products of the gradient
    on the first ``num_samples`` samples. Returns ``(nodes, weights)``: the Ritz values (ascending)
    and ``D·τ²`` (the squared first components of the Ritz vectors times the number of sampled
    weights ``D``), so that ``Σ weights·f(nodes) ≈ tr f(∇²L_n)``. ``2·num_steps`` model
    evaluations; empty arrays when a product is not finite.
    """
    with _two_rows(target):
        return _lanczos(target, min(int(num_steps), int(target.num_selected)), seed, num_samples)


@contextlib.contextmanager
def _two_rows(target: SamplingTarget) -> Iterator[None]:
    """The target's gradient mode for the probes' two rows (±δ), restored afterwards: the
    chains decide their own mode for their own number of rows."""
    mode = target.mode
    target.decide_mode(2)
    try:
        yield
    finally:
        target.mode = mode


def _probe_setup(target: SamplingTarget, num_samples: int
                 ) -> tuple[list[Tensor], Tensor, Tensor, float]:
    """The samples, w*, the sampled coordinates and the finite-difference step of a coordinate
    (10⁻³ of the weights' RMS) for the Hessian-vector products of both spectra."""
    batch = [t[:num_samples] for t in target.leaves]
    anchor = target.anchor
    if target.mask is not None:
        coords = torch.nonzero(target.mask > 0).flatten()
    else:
        coords = torch.arange(target.dim, device=anchor.device)
    scale = float(anchor.pow(2).mean().sqrt()) if target.dim else 1.0
    return batch, anchor, coords, 1e-3 * max(scale, 1e-2)


def _lanczos(target: SamplingTarget, steps: int, seed: int, num_samples: int
             ) -> tuple[np.ndarray, np.ndarray]:
    batch, anchor, coords, delta = _probe_setup(target, num_samples)
    size = len(coords)
    if size == 0 or steps <= 0:
        return np.zeros(0), np.zeros(0)
    delta *= math.sqrt(size)  # a unit vector spreads over D weights
    gen = np.random.default_rng(seed)
    basis = np.zeros((steps + 1, size))
    basis[0] = gen.choice([-1.0, 1.0], size) / math.sqrt(size)
    alpha, beta = np.zeros(steps), np.zeros(steps)
    done = steps
    for j in range(steps):
        v = torch.zeros(2, target.dim, device=anchor.device, dtype=anchor.dtype)
        q = torch.as_tensor(basis[j], device=anchor.device, dtype=anchor.dtype)
        v[0, coords] = q
        v[1, coords] = -q
        g, _ = target.grad_and_loss(anchor + delta * v, batch, True)
        hv = ((g[0] - g[1]) / (2 * delta))[coords].double().cpu().numpy()
        if not np.isfinite(hv).all():
            return np.zeros(0), np.zeros(0)
        alpha[j] = hv @ basis[j]
        for _ in range(2):  # full re-orthogonalization, twice
            hv -= basis[:j + 1].T @ (basis[:j + 1] @ hv)
        beta[j] = np.linalg.norm(hv)
        if beta[j] <= 1e-10 * max(abs(alpha[:j + 1]).max(), 1e-30):
            done = j + 1
            break
        basis[j + 1] = hv / beta[j]
    off = beta[:done - 1]
    tri = np.diag(alpha[:done]) + np.diag(off, 1) + np.diag(off, -1)
    nodes, vecs = np.linalg.eigh(tri)
    return nodes, size * vecs[0] ** 2


def hessian_eigenvalues(target: SamplingTarget, *, num_samples: int = SPECTRUM_SAMPLES
                        ) -> np.ndarray:
    """Eigenvalues of ``∇²L_n(w*)`` over the sampled weights (ascending, float64).

    Column ``i`` is the central difference of the gradient along the unit vector ``e_i``, on the
    first ``num_samples`` samples; the matrix is symmetrized before the eigen-decomposition.
    """
    with _two_rows(target):
        return _eigenvalues(target, num_samples)


def _eigenvalues(target: SamplingTarget, num_samples: int) -> np.ndarray:
    batch, anchor, coords, delta = _probe_setup(target, num_samples)
    cols = []
    for start in range(0, len(coords), 2):
        idx = coords[start:start + 2]
        v = torch.zeros(len(idx), target.dim, device=anchor.device, dtype=anchor.dtype)
        v[torch.arange(len(idx)), idx] = 1.0
        gp, _ = target.grad_and_loss(anchor + delta * v, batch, True)
        gp = gp.clone()  # the loop mode returns a view of a reused buffer
        gm, _ = target.grad_and_loss(anchor - delta * v, batch, True)
        hv = ((gp - gm) / (2 * delta))[:, coords]
        cols.append(hv.double().cpu())
    if not cols:
        return np.zeros(0)
    hess = torch.cat(cols).numpy()
    hess = 0.5 * (hess + hess.T)
    if not np.isfinite(hess).all():
        return np.zeros(0)
    return np.linalg.eigvalsh(hess)


@dataclass(frozen=True)
class RelaxationCheck:
    """The predicted relaxation of the chains' slow directions (quadratic model at w*).

    Attributes:
        deficit: fraction of the quadratic equilibrium ``Σ ½·h/(h + γ)`` the draws are
            predicted to miss (:func:`devinterp.analyses.diagnostics.relaxation_deficit`).
        equilibrium: that equilibrium, ``Σ ½·h/(h + γ)`` over the eigenvalues h of
            ``nβ·∇²L_n(w*)`` (the Laplace value of λ̂; the true λ of a singular model may differ).
        slow: directions counting ≥ 0.1 towards it that reach < 90% of their equilibrium.
        slow_curvatures: the smallest and largest ``nβ·μ`` among them ((nan, nan) when none).
        steps_needed: chain length (half burn-in) that brings ``deficit`` to
            :data:`DEFICIT_AIM` at the same step size.
        cost: model evaluations spent on the spectrum.
    """

    deficit: float
    equilibrium: float
    slow: int
    slow_curvatures: tuple[float, float]
    steps_needed: int
    cost: int

    def message(self, num_chains: int, num_burnin: int, num_draws: int, spent: int,
                step_size: float) -> str:
        """The warning text: what is slow, how much λ̂ misses, what budget would do."""
        lo, hi = self.slow_curvatures
        total = num_burnin + num_draws
        needed = spent + num_chains * self.steps_needed
        band = "" if not math.isfinite(lo) else f" (curvature nβ·μ from {lo:.3g} to {hi:.3g})"
        return (f"{self.slow} slow direction(s){band} have not relaxed: at step_size="
                f"{step_size:.3g} they need up to {self.steps_needed:,} steps per chain, the "
                f"chains ran {total:,}; λ̂ is predicted to read ~{self.deficit:.0%} below its "
                f"equilibrium (quadratic model at w*: {self.equilibrium:.3g}). The curvature "
                f"spectrum at w* is ill-conditioned; more chains do not help, longer ones do: "
                f"budget={_round_up(needed):,} ({num_chains} × {self.steps_needed:,} steps) is "
                f"predicted to bring it within {DEFICIT_AIM:.0%}")


def check_relaxation(eigenvalues: np.ndarray, *, nbeta: float, step_size: float,
                     localization: float, num_burnin: int, num_draws: int,
                     cost: int = 0, weights: np.ndarray | None = None) -> RelaxationCheck:
    """Predict how far the draws are from equilibrium from the spectrum of ``∇²L_n(w*)``
    (its eigenvalues, or quadrature nodes with ``weights`` from :func:`lanczos_spectrum`)."""
    h = np.clip(np.asarray(eigenvalues, dtype=np.float64) * nbeta, 0.0, None)
    deficit, eq = diag.relaxation_deficit(h, step_size, localization, num_burnin, num_draws,
                                          weights)
    frac = diag.relaxed_fractions(h, step_size, localization, num_burnin, num_draws)
    weight = 0.5 * h / (h + localization)
    slow = (frac < 0.9) & (weight >= 0.1)
    count = np.ones_like(h) if weights is None else np.asarray(weights, dtype=np.float64)
    curv = (float(h[slow].min()), float(h[slow].max())) if slow.any() else (math.nan, math.nan)
    need = diag.steps_to_relax(h, step_size, localization, tolerance=DEFICIT_AIM,
                               weights=weights)
    return RelaxationCheck(deficit=deficit, equilibrium=eq,
                           slow=int(round(float(count[slow].sum()))),
                           slow_curvatures=curv, steps_needed=int(need), cost=int(cost))


def _round_up(x: float) -> int:
    """Round up to two significant digits (a budget to suggest)."""
    if x <= 0:
        return 0
    mag = 10 ** max(int(math.floor(math.log10(x))) - 1, 0)
    return int(math.ceil(x / mag) * mag)


#: A re-plan must predict at most this fraction of the planned deficit to be used.
REPLAN_GAIN = 0.8


def replan(eigenvalues: np.ndarray, *, nbeta: float, step_size: float, localization: float,
           num_chains: int, num_burnin: int, num_draws: int, max_step_size: float,
           weights: np.ndarray | None = None) -> tuple[int, int, int, float, str] | None:
    """The same number of steps split for slow directions, when the planned split is too slow.

    When the planned chains are predicted to miss more than :data:`DEFICIT_WARN` of the
    equilibrium, try one chain with every step (half burn-in) at ``step_size`` and at up to
    twice it (capped at ``max_step_size``; the step-size correction removes the first-order
    bias of the larger step). Returns ``(chains, burn-in, draws, step size, note)`` for the
    candidate with the smallest predicted deficit when it is at most :data:`REPLAN_GAIN` of the
    planned one, else None.
    """
    h = np.clip(np.asarray(eigenvalues, dtype=np.float64) * nbeta, 0.0, None)
    planned, _ = diag.relaxation_deficit(h, step_size, localization, num_burnin, num_draws,
                                         weights)
    if planned <= DEFICIT_WARN:
        return None
    total = num_chains * (num_burnin + num_draws)
    burn = total // 2
    best = None
    for eps in sorted({step_size, min(2 * step_size, max(max_step_size, step_size))}):
        deficit, _ = diag.relaxation_deficit(h, eps, localization, burn, total - burn, weights)
        if best is None or deficit < best[0]:
            best = (deficit, eps)
    deficit, eps = best
    if deficit > REPLAN_GAIN * planned:
        return None
    note = (f"re-planned for slow directions: the {total:,} steps as 1 chain × ({burn} burn-in + "
            f"{total - burn} draws) at step_size={eps:.3g} (planned: {num_chains} × "
            f"({num_burnin} + {num_draws}) at {step_size:.3g}); the predicted relaxation deficit "
            f"falls from {planned:.0%} to {deficit:.0%}. One chain gives no R-hat and a "
            "within-chain stderr only")
    return 1, burn, total - burn, float(eps), note
