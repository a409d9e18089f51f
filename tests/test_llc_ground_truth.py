"""Ground truth: λ̂ against exact learning coefficients (noise-free teachers, so L_n(w*) = 0).

Tolerance: |λ̂ − λ| ≤ 15% of λ + 2·stderr, with the hyper-parameters chosen here.
"""

import pytest

from devinterp.analyses import estimate_llc
from devinterp.analyses.theory import (
    make_dln_problem,
    make_normal_crossing_problem,
    make_regular_problem,
    make_rrr_problem,
)

BASE = dict(num_chains=4, localization=1.0, seed=0)


def _check(problem, **kw):
    r = estimate_llc(problem.model, problem.data, problem.loss_fn, **{**BASE, **kw})
    err = abs(r.mean - problem.llc)
    msg = (f"{problem.description}: λ̂={r.mean:.3f} ± {r.stderr:.3f}, λ={problem.llc:.3f}, "
           f"rel {err / problem.llc:.1%}, warnings={r.warnings}")
    assert err <= 0.15 * problem.llc + 2 * r.stderr, msg
    assert err <= 0.15 * problem.llc * 1.5, msg  # stderr may not rescue a far-off estimate
    return r


LINEAR = dict(step_size=1e-4, batch_size=1000, num_draws=1000, num_burnin=300)


def test_reduced_rank_regression_fast():
    _check(make_rrr_problem(5, 3, 5, 1, 10_000, noise_std=0.0),
           **dict(LINEAR, num_draws=600, num_burnin=200))


@pytest.mark.slow
def test_regular_linear_regression():
    _check(make_regular_problem(4, 2, 10_000, noise_std=0.0), **LINEAR)


@pytest.mark.slow
@pytest.mark.parametrize("m,h,n,r", [(5, 4, 5, 0), (4, 3, 8, 1), (6, 2, 3, 1)])
def test_reduced_rank_regression(m, h, n, r):
    _check(make_rrr_problem(m, h, n, r, 10_000, seed=1, noise_std=0.0), **LINEAR)


@pytest.mark.slow
def test_regular_larger():
    _check(make_regular_problem(8, 3, 10_000, seed=2, noise_std=0.0), **LINEAR)


@pytest.mark.slow
@pytest.mark.parametrize("exponents", [(1, 2), (1, 3)])
def test_normal_crossing(exponents):
    _check(make_normal_crossing_problem(exponents, 10_000, noise_std=0.0), step_size=5e-3,
           batch_size=200, num_draws=3000, num_burnin=1000)


@pytest.mark.slow
@pytest.mark.parametrize("widths,r", [([10] * 5, 5), ([4, 5, 6, 4], 1), ([6, 6, 6, 6], 2)])
def test_deep_linear_network(widths, r):
    _check(make_dln_problem(widths, r, 10_000, seed=0, noise_std=0.0), step_size=3e-5,
           batch_size=500, num_draws=1500, num_burnin=500)
