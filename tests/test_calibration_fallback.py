"""The calibration's fallback (no step size met every criterion) never uses a pilot that failed badly."""

from __future__ import annotations

import math

import pytest
import torch

from devinterp.analyses.calibration import (
    PilotRow,
    _below_grid,
    _fallback,
    calibrate,
)

NAN = float("nan")


def row(eps, *, acc=NAN, plateau=False, diverged=False, llc=NAN, gamma=1.0, step=-1):
    return PilotRow(step_size=eps, localization=gamma, llc=llc, stderr=1.0, burnin=20, plateau=plateau,
                    acceptance=acc, frac_below=0.0, drift=NAN, drift_stderr=NAN, tau_int=5.0,
                    diverged=diverged, diverged_step=step if diverged else -1, seconds=1.0)


# the table that made `devinterp analyze --llc-budget 1500` on the quick demo store pick ε=1.57e-3
# (its pilot accepted nothing) and every chain diverge
QUICK_STORE = [row(6.29e-3, diverged=True, step=12), row(3.15e-3, diverged=True, step=43),
               row(1.57e-3, acc=6.3e-9, llc=948.1)]


def test_every_pilot_failed_badly_gives_no_fallback_row_and_a_step_size_below_the_grid():
    chosen, why = _fallback(QUICK_STORE, min_acceptance=0.9, max_below=0.3, drift_tol=0.15)
    assert chosen is None and "badly" in why
    eps, how = _below_grid(QUICK_STORE, min_acceptance=0.9)
    smallest = min(r.step_size for r in QUICK_STORE)
    assert smallest / 16 <= eps <= smallest / 2
    assert "acceptance" in how


@pytest.mark.parametrize("bad", [row(2e-3, acc=0.0, llc=5.0), row(2e-3, acc=0.01, plateau=True, llc=5.0),
                                 row(2e-3, diverged=True, step=3), row(2e-3, acc=0.8, plateau=True, llc=-1.0)])
def test_a_badly_failed_pilot_is_never_chosen_over_a_sound_smaller_one(bad):
    sound = row(5e-4, acc=0.6, plateau=True, llc=40.0)  # below min_acceptance, but well behaved
    for table in ([bad, sound], [sound, bad]):
        chosen, _ = _fallback(table, min_acceptance=0.9, max_below=0.3, drift_tol=0.15)
        assert chosen is sound


def test_fallback_prefers_plateau_then_acceptance_then_the_smaller_step():
    a = row(4e-3, acc=0.7, plateau=False, llc=30.0)
    b = row(2e-3, acc=0.6, plateau=True, llc=30.0)
    c = row(1e-3, acc=0.8, plateau=True, llc=30.0)
    assert _fallback([a, b, c], min_acceptance=0.9, max_below=0.3, drift_tol=0.15)[0] is c
    d = row(5e-4, acc=0.8, plateau=True, llc=30.0)
    assert _fallback([a, b, c, d], min_acceptance=0.9, max_below=0.3, drift_tol=0.15)[0] is d


def test_below_grid_after_a_divergence_and_when_nothing_was_accepted():
    eps, _ = _below_grid([row(1e-2, diverged=True, step=2)], min_acceptance=0.9)
    assert math.isclose(eps, 1e-2 / 4)
    eps, _ = _below_grid([row(1e-2, acc=0.0, llc=3.0)], min_acceptance=0.9)
    assert math.isclose(eps, 1e-2 / 16)


def test_calibrate_with_only_bad_step_sizes_goes_below_the_grid_and_says_so():
    """End to end: a grid of far too large step sizes and a small budget -> a pilot below the grid."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    w = torch.randn(8, 1)
    y = x @ w + 0.1 * torch.randn(256, 1)
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():  # at the least-squares minimum
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(256, 1)], 1), y).solution
        model.weight.copy_(sol[:8].T)
        model.bias.copy_(sol[8])

    def loss_fn(m, batch):
        xb, yb = batch
        return torch.nn.functional.mse_loss(m(xb), yb)

    cal = calibrate(model, (x, y), loss_fn, step_sizes=[0.5, 0.25], num_steps=60, budget=800,
                    batch_size=256, seed=1, progress=False, vectorize=False, compile=False)
    assert not cal.ok
    tried = {r.step_size for r in cal.table}
    assert cal.step_size < 0.25 and "failed badly" in cal.reason and cal.warnings
    bad = [r for r in cal.table if r.step_size in (0.5, 0.25)]
    assert all(r.diverged or not r.acceptance >= 0.45 for r in bad)  # the premise: the grid is bad
    if cal.step_size in tried:  # a pilot below the grid ran and behaved
        assert cal.chosen_row().acceptance >= 0.45
