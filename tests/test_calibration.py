"""Calibration: contracts (seeded, JSON, CLI, reuse, precedence, warnings) and ground truth."""

import json
import math
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from devinterp.analyses import estimate_llc
from devinterp.analyses.calibration import Calibration, burnin_length, calibrate
from devinterp.analyses.theory import make_dln_problem, make_rrr_problem
from devinterp.errors import (
    CalibrationWarning,
    ChainDivergedError,
    DevinterpWarning,
    InvalidInputError,
    NotAtMinimumWarning,
)

ROOT = Path(__file__).parents[1]
QUICK = dict(num_steps=120, grid_size=4, min_draws=200, max_draws=400, max_burnin=300)


@pytest.fixture(scope="module")
def rrr():
    return make_rrr_problem(4, 2, 4, 1, 2000, seed=0, noise_std=0.0)


@pytest.fixture(scope="module")
def quick_cal(rrr):
    return calibrate(rrr.model, rrr.data, rrr.loss_fn, seed=0, **QUICK)


def test_calibration_is_reproducible_with_a_seed(rrr, quick_cal):
    again = calibrate(rrr.model, rrr.data, rrr.loss_fn, seed=0, **QUICK)
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "seconds"}  # noqa: E731
    a, b = strip(quick_cal), strip(again)
    for rows in (a["table"], b["table"]):
        for row in rows:
            row.pop("seconds")
    assert a == b
    other = calibrate(rrr.model, rrr.data, rrr.loss_fn, seed=1, **QUICK)
    assert [r.llc for r in other.table] != [r.llc for r in quick_cal.table]


def test_table_and_choice_are_consistent(quick_cal):
    cal = quick_cal
    steps = [r.step_size for r in cal.table]
    assert steps == sorted(steps, reverse=True)
    assert np.allclose(np.diff(np.log2(steps)), -1.0)
    row = cal.chosen_row()
    assert row is not None and not row.diverged
    assert cal.ok and row.acceptance >= 0.9 and row.llc > 0
    # the chosen step is the largest that passed: every larger one failed a criterion
    for r in cal.table:
        if r.step_size > cal.step_size:
            assert r.diverged or r.acceptance < 0.9 or r.drift - 2 * r.drift_stderr > 0.15
    assert cal.num_burnin >= 200 and 200 <= cal.num_draws <= 400
    assert "largest step size" in cal.reason
    s = cal.scalars()
    assert s["calibration/step_size"] == cal.step_size and all(k.startswith("calibration/") for k in s)


def test_json_round_trip(quick_cal, tmp_path):
    d = quick_cal.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON (NaN written as null)
    back = Calibration.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    assert back.estimate_kwargs() == quick_cal.estimate_kwargs()
    path = tmp_path / "cal.json"
    quick_cal.save(path)
    assert Calibration.load(path).to_dict() == d
    with pytest.raises(InvalidInputError, match="lacks"):
        Calibration.from_dict({k: v for k, v in d.items() if k != "step_size"})
    with pytest.raises(InvalidInputError, match="version"):
        Calibration.from_dict({**d, "format_version": 99})


def test_plot_and_tensorboard(quick_cal, tmp_path):
    png = tmp_path / "cal.png"
    quick_cal.plot(png)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "tb") as w:
        quick_cal.log_tensorboard(w, step=5)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_estimate_uses_and_reports_calibration_and_explicit_values_win(rrr, quick_cal):
    r = estimate_llc(rrr.model, rrr.data, rrr.loss_fn, calibration=quick_cal, seed=0)
    assert r.calibration is quick_cal
    assert r.config.step_size == quick_cal.step_size
    assert r.config.num_draws == quick_cal.num_draws
    assert r.config.num_burnin == quick_cal.num_burnin
    r2 = estimate_llc(rrr.model, rrr.data, rrr.loss_fn, calibration=quick_cal, seed=0,
                      step_size=quick_cal.step_size / 2, num_draws=50)
    assert r2.config.step_size == quick_cal.step_size / 2 and r2.config.num_draws == 50
    assert r2.config.num_burnin == quick_cal.num_burnin
    # an explicit step size without a calibration: no calibration, the old defaults
    r3 = estimate_llc(rrr.model, rrr.data, rrr.loss_fn, step_size=1e-4, num_draws=50,
                      num_burnin=10)
    assert r3.calibration is None and r3.config.localization == 1.0 and r3.config.num_chains == 4


def test_reuse_across_snapshots_and_warning_when_it_no_longer_fits(rrr, quick_cal):
    # a later "snapshot": the same network slightly moved but still near the minimum
    later = make_rrr_problem(4, 2, 4, 1, 2000, seed=0, noise_std=0.0)
    with torch.no_grad():
        for p in later.model.parameters():
            p.mul_(1.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        r = estimate_llc(later.model, later.data, later.loss_fn, calibration=quick_cal, seed=1)
    assert r.calibration is quick_cal and r.mean > 0
    # a snapshot whose loss scale changed 100x: the reused step size no longer fits
    scaled = lambda model, batch: 100.0 * later.loss_fn(model, batch)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            r = estimate_llc(later.model, later.data, scaled, calibration=quick_cal, seed=1)
        except ChainDivergedError as exc:  # a divergence says to recalibrate as well
            assert "calibrate again" in str(exc)
        else:
            assert any("reused calibration" in w for w in r.warnings)
            assert any(issubclass(w.category, CalibrationWarning) for w in caught)


def test_warning_when_not_at_a_minimum():
    prob = make_dln_problem([4, 4, 4], 1, 2000, seed=0, noise_std=0.0)
    with torch.no_grad():  # move w* far from the teacher: SGLD descends
        for p in prob.model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    with pytest.warns(NotAtMinimumWarning, match="not look like a local minimum"):
        r = estimate_llc(prob.model, prob.data, prob.loss_fn, step_size=1e-3, num_draws=200,
                         num_burnin=0, localization=0.1, seed=0)
    assert any("train longer" in w for w in r.warnings)
    assert issubclass(NotAtMinimumWarning, DevinterpWarning)


def test_burnin_length_reads_the_plateau():
    rng = np.random.default_rng(0)
    t = np.arange(2000)
    trace = (1 - np.exp(-t / 100.0))[None] + 0.01 * rng.standard_normal((2, 2000))
    burn, plateau = burnin_length(trace)
    assert plateau and 200 <= burn <= 700
    flat = 0.01 * rng.standard_normal((2, 2000))
    assert burnin_length(flat)[0] <= 300
    rising = (t / 2000.0)[None] + 0.001 * rng.standard_normal((2, 2000))
    assert not burnin_length(rising)[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=10), "num_steps"),
    (dict(min_acceptance=1.5), "min_acceptance"),
    (dict(step_sizes=[]), "step_sizes"),
    (dict(step_sizes=[-1.0]), "step_sizes"),
    (dict(sampler="sgnht"), "sgld"),
])
def test_bad_input(rrr, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        calibrate(rrr.model, rrr.data, rrr.loss_fn, **kwargs)
    with pytest.raises(InvalidInputError, match="Calibration"):
        estimate_llc(rrr.model, rrr.data, rrr.loss_fn, calibration={"step_size": 1e-4})
    with pytest.raises(InvalidInputError, match="auto"):
        estimate_llc(rrr.model, rrr.data, rrr.loss_fn, step_size="big")


def test_cli_prints_the_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "devinterp", "calibrate", "--problem", "rrr:4,2,4:r=1", "--n",
         "2000", "--num-steps", "100", "--grid-size", "4", "--png", str(tmp_path / "c.png"),
         "--save", str(tmp_path / "c.json")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "step_size" in out.stdout and "accept" in out.stdout and "chosen:" in out.stdout
    assert out.stdout.count("\n*") == 1 or sum(line.startswith("*") for line in
                                               out.stdout.splitlines()) == 1
    assert (tmp_path / "c.png").exists()
    assert Calibration.load(tmp_path / "c.json").n == 2000
    bad = subprocess.run([sys.executable, "-m", "devinterp", "calibrate", "--problem", "xyz"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "dln:" in bad.stderr + bad.stdout


def test_filling_the_budget_spends_at_least_half_of_each_chain_on_burn_in():
    """The pilots see only the fast part of the relaxation; λ̂ of a chain from w* keeps rising
    for ~1,000-2,000 steps on deep linear networks, so the draws come from the second half."""
    from devinterp.analyses.budget import fit_lengths
    from devinterp.analyses.calibration import BURNIN_FRACTION, _fill_budget

    per_check = 1 + 1 / 30
    # room to stretch: burn-in raised to half of each (stretched) chain, the cost within bounds
    c, b, d, text = _fill_budget(2, 200, 1500, 4000, max_burnin=20_000, max_draws=20_000)
    assert c == 2 and b >= BURNIN_FRACTION * (b + d) and d > 0 and "stretched" in text
    assert c * (b + d) * per_check <= 4000 + 2
    # a calibrated burn-in longer than half is kept (stretched in proportion)
    c, b, d, _ = _fill_budget(2, 900, 300, 3000, max_burnin=20_000, max_draws=20_000)
    assert b > d and b >= 900
    # draws beyond the budget: burn-in takes half of what a chain can afford, the draws are cut
    # later by fit_lengths (which keeps the burn-in and warns in estimate_llc)
    c, b, d, text = _fill_budget(2, 200, 5000, 3000, max_burnin=20_000, max_draws=20_000)
    per = 3000 / 2 / per_check
    assert b == math.ceil(BURNIN_FRACTION * per) and d == 5000 and "num_burnin raised" in text
    fc, fb, fd = fit_lengths(c, b, d, 3000)
    assert (fc, fb) == (2, b) and 0.9 * b <= fd <= 1.1 * b
    # ... but never beyond max_burnin
    assert _fill_budget(2, 200, 5000, 3000, max_burnin=300, max_draws=20_000)[1] == 300


def test_auto_estimate_on_a_small_dln_fast():
    prob = make_dln_problem([4, 5, 6, 4], 1, 10_000, seed=0, noise_std=0.0)
    r = estimate_llc(prob.model, prob.data, prob.loss_fn, seed=0)
    assert r.calibration is not None and r.calibration.ok
    assert abs(r.mean - prob.llc) / prob.llc <= 0.15, (r.mean, prob.llc, str(r.calibration))


# ---- ground truth (slow) ----------------------------------------------------------------------
DLNS = [([10] * 5, 5), ([6, 6, 6, 6], 2), ([10, 10, 10, 10], 3), ([3, 8, 8, 3], 1),
        ([8, 6, 4, 6, 8], 2)]
RRRS = [(5, 3, 5, 1), (5, 4, 5, 0), (4, 3, 8, 1), (6, 2, 3, 1), (6, 3, 4, 1)]


def _rel_errors(problems, seed):
    errs = []
    for p in problems:
        r = estimate_llc(p.model, p.data, p.loss_fn, seed=seed)
        assert r.cost <= 5000, r.cost
        errs.append(abs(r.mean - p.llc) / p.llc)
        print(f"{p.description}: λ̂={r.mean:.3f} λ={p.llc} rel={errs[-1]:.1%}")
    return errs


@pytest.mark.slow
def test_ground_truth_deep_linear_networks():
    errs = _rel_errors([make_dln_problem(w, r, 10_000, 0, noise_std=0.0) for w, r in DLNS], 0)
    # The goal (issue 13): max <= 25%. Measured within the default budget (step-size corrected,
    # half of each chain burn-in): 10.1, 11.6, 6.8, 2.3, 12.9% (all read low: the chains are
    # short for the slow directions; benchmarks/calibration_accuracy.py --family dln)
    assert statistics.median(errs) <= 0.15 and max(errs) <= 0.25, errs


@pytest.mark.slow
def test_ground_truth_deep_rank_one_networks_within_the_default_budget():
    """Deep rank-1 networks (one of them read 37% off before the budget work)."""
    nets = [([4, 5, 6, 4], 1), ([3, 8, 8, 3], 1), ([5, 5, 5, 5, 5], 1), ([6, 3, 6, 3], 1)]
    errs = _rel_errors([make_dln_problem(w, r, 10_000, 1, noise_std=0.0) for w, r in nets], 1)
    assert max(errs) <= 0.25, errs


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_ground_truth_larger_deep_linear_networks_within_the_default_budget(seed):
    """Thousands to tens of thousands of weights, λ from ~130 to ~3,900, depths 3-5, ranks
    1-20 (benchmarks/calibration_accuracy.py --family large prints the same per network)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.calibration_accuracy import LARGE

    errs = _rel_errors([make_dln_problem(w, r, 10_000, seed, noise_std=0.0) for w, r in LARGE],
                       seed)
    # The goal (issue 13): median <= 10%, max <= 20%. Measured with the Lanczos slow-direction
    # check: seed 0 median 7.8%, max 13.9%; seed 1 7.3%, 15.1% (both the depth-5 [30]*6 r=3,
    # re-planned as one longer chain; −19.9% / −15.6% before; docs/calibration.md).
    assert statistics.median(errs) <= 0.10 and max(errs) <= 0.20, errs


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_ground_truth_reduced_rank_regression(seed):
    # seed 1 read M=6 H=2 N=3 r=1 +36.5% before the step-size correction, +7.9% with it
    errs = _rel_errors([make_rrr_problem(m, h, n, r, 10_000, seed, noise_std=0.0)
                        for m, h, n, r in RRRS], seed)
    assert statistics.median(errs) <= 0.10 and max(errs) <= 0.25, errs
    assert math.isfinite(sum(errs))


class _Sharp(torch.nn.Module):
    """Loss ``c·log(1 + ‖w‖²/s²)``: curvature 2c/s² at w* = 0, nearly flat in the posterior's
    bulk (a trained network's minimum in miniature)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return torch.log1p(self.w.pow(2).sum() / 0.01) * x.mean()


def test_mala_acceptance_tends_to_one_on_a_quadratic():
    from devinterp.analyses.sampling import prepare_target, sample_chains

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 20, generator=gen)
    y = x @ torch.randn(20, 1, generator=gen)
    model = torch.nn.Linear(20, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    target = prepare_target(model, (x, y), lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    h = 2000 / math.log(2000) * 2 * float(torch.linalg.eigvalsh(x.T @ x / 2000).max()) + 1.0
    acc = [float(sample_chains(target, num_chains=2, num_steps=60, step_size=k / h,
                               acceptance_steps=range(20, 60, 2)).acceptance.mean())
           for k in (1.0, 0.1, 0.01, 1e-3)]
    assert acc[0] < 0.9 and acc[-1] > 0.995, acc
    assert all(a <= b + 0.01 for a, b in zip(acc, acc[1:], strict=False)), acc


def test_pilot_acceptance_ignores_the_burn_in_near_a_sharp_minimum():
    from devinterp.analyses.calibration import _pilot
    from devinterp.analyses.sampling import prepare_target

    target = prepare_target(_Sharp(50), (torch.ones(100, 1),), lambda m, b: m(b[0]))
    row, _ = _pilot(target, step_size=0.05, localization=1.0, nbeta=5.0, num_chains=2,
                    num_steps=200, sampler="sgld", seed=0, sampler_kwargs=None)
    from devinterp.analyses.sampling import sample_chains
    tr = sample_chains(target, num_chains=2, num_steps=200, step_size=0.05, localization=1.0,
                       nbeta=5.0, acceptance_steps=range(0, 200, 5))
    early = float(tr.acceptance[:4].mean())
    assert row.plateau and row.acceptance > 0.9 and early < row.acceptance - 0.2, (early, row)
    assert math.isfinite(row.acceptance_stderr)
