"""Exact learning coefficients of models where they are known, and the models themselves.

Ground truth for testing LLC estimators (see REFERENCES §2):

- regular models: λ = d/2;
- normal crossing ``f(x) = (∏ w_i^{k_i})·x``: λ = 1/(2·max k_i);
- reduced-rank regression (Aoyagi & Watanabe 2005);
- deep linear networks (Aoyagi 2024).

The ``make_*_problem`` helpers build each model *at* a true parameter together with a dataset drawn
from it and a Gaussian negative log-likelihood loss (σ = 1, constants dropped), so that
``estimate_llc(problem.model, problem.data, problem.loss_fn)`` should find ``problem.llc``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from devinterp.errors import InvalidInputError


def _check_nonneg_ints(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidInputError(f"{name} must be a non-negative int, got {v!r}")


def regular_llc(num_params: int) -> float:
    """λ = d/2 for a regular (identifiable, non-degenerate Fisher information) model."""
    _check_nonneg_ints(num_params=num_params)
    return num_params / 2


def normal_crossing_llc(exponents: Sequence[int]) -> float:
    """λ = 1/(2·max k_i) for ``f(x) = w_1^{k_1}···w_m^{k_m}·x`` at the true parameter 0."""
    if not exponents or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                            for k in exponents):
        raise InvalidInputError(f"exponents must be positive ints, got {exponents!r}")
    return 1 / (2 * max(exponents))


def rrr_llc(input_dim: int, output_dim: int, rank: int, true_rank: int) -> float:
    """Learning coefficient of reduced-rank regression ``y = B·A·x`` (Aoyagi & Watanabe 2005).

    Args:
        input_dim: M.
        output_dim: N.
        rank: H, the learner's inner width (``A`` is H×M, ``B`` is N×H).
        true_rank: r ≤ H, the rank of the true matrix.
    """
    m, n, h, r = input_dim, output_dim, rank, true_rank
    _check_nonneg_ints(input_dim=m, output_dim=n, rank=h, true_rank=r)
    if r > h:
        raise InvalidInputError(f"true_rank {r} exceeds the learner's rank {h}")
    if n + r <= m + h and m + r <= n + h and h + r <= m + n:
        odd = 1 if (m + n + h + r) % 2 else 0
        return (2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2 + odd) / 8
    if m + h < n + r:
        return (m * h + n * r - h * r) / 2
    if n + h < m + r:
        return (n * h + m * r - h * r) / 2
    return m * n / 2


def dln_llc(widths: Sequence[int], true_rank: int) -> float:
    """Learning coefficient of a deep linear network (Aoyagi 2024).

    Args:
        widths: H_0 (input), H_1, ..., H_M (output); the network is ``W_M ··· W_1 x``.
        true_rank: r, the rank of the true end-to-end matrix (at most the smallest width).

    The formula: with ``M_j = H_j − r``, take S = the smallest ℓ+1 of the M_j forming the first
    prefix (in ascending order) with ``max_S < min_rest``, ``Σ_S ≥ ℓ·max_S`` and
    ``Σ_S < ℓ·min_rest`` (rest non-empty); then with Σ = Σ_S M_j and ``a = Σ − (⌈Σ/ℓ⌉ − 1)·ℓ``,

        λ = (−r² + r(H_0 + H_M))/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4·(Σ/ℓ)² + ½·Σ_{i<j∈S} M_i M_j.
    """
    widths = list(widths)
    if len(widths) < 2:
        raise InvalidInputError(f"a deep linear network needs >= 2 widths, got {widths}")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise InvalidInputError(f"widths must be positive ints, got {widths}")
    _check_nonneg_ints(true_rank=true_rank)
    r = true_rank
    if r > min(widths):
        raise InvalidInputError(f"true_rank {r} exceeds the smallest width {min(widths)}")
    if len(widths) == 2:  # a single matrix: regular, λ = H_0·H_1/2
        return widths[0] * widths[1] / 2
    ms = sorted(h - r for h in widths)
    for ell in range(1, len(ms)):
        s, rest = ms[:ell + 1], ms[ell + 1:]
        total = sum(s)
        if rest and not max(s) < min(rest):
            continue
        if total < ell * max(s):
            continue
        if rest and not total < ell * min(rest):
            continue
        break
    else:  # pragma: no cover - the full set always satisfies the conditions
        raise AssertionError(f"no admissible subset for widths={widths}, r={r}")
    mean = Fraction(total, ell)
    a = total - (math.ceil(mean) - 1) * ell
    pairs = sum(s[i] * s[j] for i in range(len(s)) for j in range(i + 1, len(s)))
    lam = (Fraction(-r * r + r * (widths[0] + widths[-1]), 2) + Fraction(a * (ell - a), 4 * ell)
           - Fraction(ell * (ell - 1), 4) * mean**2 + Fraction(pairs, 2))
    return float(lam)


# --------------------------------------------------------------------------------------------
# problems at a true parameter
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """A model at a true parameter, data drawn from it and its loss, with the exact λ.

    Attributes:
        model: the network at the true parameter w0.
        data: a tuple ``(x, y)`` of tensors.
        loss_fn: ``loss_fn(model, (x, y))`` = mean over the batch of ½‖y − model(x)‖²
            (Gaussian negative log-likelihood with σ = 1, constants dropped).
        llc: the exact learning coefficient at w0.
        num_params: the number of parameters d.
        description: a short text naming the problem.
    """

    model: nn.Module
    data: tuple[Tensor, Tensor]
    loss_fn: Callable[[nn.Module, Any], Tensor]
    llc: float
    num_params: int
    description: str


def gaussian_nll(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Mean over the batch of ½‖y − model(x)‖² (σ = 1 Gaussian NLL without constants)."""
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(-1).mean()


def _dataset(model: nn.Module, n: int, in_dim: int, noise_std: float,
             gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, in_dim, generator=gen)
    with torch.no_grad():
        y = model(x)
    y = y + noise_std * torch.randn(y.shape, generator=gen)
    return x, y


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidInputError(f"n must be an int >= 2, got {n!r}")


def make_dln_problem(widths: Sequence[int], rank: int, n: int, seed: int = 0, *,
                     noise_std: float = 1.0) -> Problem:
    """A deep linear network (no biases) at a teacher whose product has rank ``rank``.

    Layers are Gaussian with variance 1/fan-in; the first is projected onto a random rank-``rank``
    subspace of its input so that the end-to-end matrix has rank ``rank`` (one hidden layer of
    width H gives reduced-rank regression).
    """
    widths = list(widths)
    llc = dln_llc(widths, rank)
    _check_n(n)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(widths[i + 1], widths[i], generator=gen)
                             / math.sqrt(widths[i]))
        layers.append(lin)
    with torch.no_grad():
        basis, _ = torch.linalg.qr(torch.randn(widths[0], widths[0], generator=gen))
        proj = basis[:, :rank] @ basis[:, :rank].T
        layers[0].weight.copy_(layers[0].weight @ proj)
    model = nn.Sequential(*layers)
    data = _dataset(model, n, widths[0], noise_std, gen)
    d = sum(p.numel() for p in model.parameters())
    return Problem(model, data, gaussian_nll, llc, d, f"DLN widths={widths} rank={rank} n={n}")


def make_rrr_problem(input_dim: int, rank: int, output_dim: int, true_rank: int, n: int,
                     seed: int = 0, *, noise_std: float = 1.0) -> Problem:
    """Reduced-rank regression ``y = B·A·x`` (a one-hidden-layer linear network)."""
    problem = make_dln_problem([input_dim, rank, output_dim], true_rank, n, seed,
                               noise_std=noise_std)
    llc = rrr_llc(input_dim, output_dim, rank, true_rank)
    return Problem(problem.model, problem.data, problem.loss_fn, llc, problem.num_params,
                   f"RRR M={input_dim} H={rank} N={output_dim} r={true_rank} n={n}")


class NormalCrossing(nn.Module):
    """``f(x) = (∏_i w_i^{k_i})·x`` with scalar weights; the true parameter is w = 0."""

    def __init__(self, exponents: Sequence[int]):
        super().__init__()
        self.exponents = tuple(int(k) for k in exponents)
        self.w = nn.Parameter(torch.zeros(len(self.exponents)))

    def forward(self, x: Tensor) -> Tensor:
        coef = torch.ones((), dtype=self.w.dtype, device=self.w.device)
        for i, k in enumerate(self.exponents):
            coef = coef * self.w[i] ** k
        return coef * x


def make_normal_crossing_problem(exponents: Sequence[int], n: int, seed: int = 0, *,
                                 noise_std: float = 1.0) -> Problem:
    """Normal crossing model at w = 0 with data ``y = noise`` (x one-dimensional)."""
    llc = normal_crossing_llc(exponents)
    _check_n(n)
    gen = torch.Generator().manual_seed(seed)
    model = NormalCrossing(exponents)
    x, y = _dataset(model, n, 1, noise_std, gen)
    return Problem(model, (x, y), gaussian_nll, llc, len(model.exponents),
                   f"normal crossing k={tuple(exponents)} n={n}")


def make_regular_problem(in_dim: int, out_dim: int, n: int, seed: int = 0, *,
                         noise_std: float = 1.0) -> Problem:
    """Linear regression with bias ``y = W·x + b`` (regular: λ = d/2, d = out·(in + 1))."""
    _check_n(n)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        model.weight.copy_(torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim))
        model.bias.copy_(torch.randn(out_dim, generator=gen))
    x, y = _dataset(model, n, in_dim, noise_std, gen)
    d = out_dim * (in_dim + 1)
    return Problem(model, (x, y), gaussian_nll, regular_llc(d), d,
                   f"linear regression {in_dim}->{out_dim} n={n}")
