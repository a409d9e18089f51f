"""LLCCallback: a real Trainer on a tiny model; scheduled estimates, no side effects, calibration."""

from __future__ import annotations

import types
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import devinterp.callbacks.llc as llc_module
from devinterp.callbacks import LLCCallback
from devinterp.callbacks._logging import metric_history
from devinterp.errors import InvalidInputError
from devinterp.schedules import at

N, D = 128, 4
LLC_KWARGS = dict(num_chains=2, num_draws=20, num_burnin=10, step_size=1e-3, localization=10.0,
                  batch_size=32)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = x @ torch.randn(D, 1, generator=g) + 0.1 * torch.randn(N, 1, generator=g)
    return x, y


class Regression(pl.LightningModule):
    """A small MLP with dropout (uses the global RNG in training) and one frozen parameter."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


class Probe(pl.Callback):
    """Runs after LLCCallback: records the module's mode, flags and a draw of the global RNG."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step, pl_module.training, pl_module.frozen.requires_grad,
                          all(p.requires_grad for p in pl_module.net.parameters())))


def _fit(tmp_path, callbacks, *, steps=8, seed=0, ckpt_path=None, trainer_out=None):
    pl.seed_everything(seed, verbose=False)
    module = Regression()
    loader = DataLoader(TensorDataset(*_data()), batch_size=16, shuffle=True)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    if trainer_out is not None:
        trainer_out.append(trainer)
    return module, torch.rand(3)  # the global RNG stream after training


def test_estimates_at_scheduled_steps_and_publishes_the_band(tmp_path):
    cb = LLCCallback(_data(), mse, at([3, 7]), calibrate=False, model_getter=lambda m: m.net,
                     **LLC_KWARGS)
    trainers = []
    _fit(tmp_path, [cb], trainer_out=trainers)
    history = metric_history(trainers[0])
    for tag in ("llc/mean", "llc/std", "llc/stderr", "llc/lower", "llc/upper"):
        assert [s for s, _ in history[tag]] == [0, 3, 7], tag
    for (_, mean), (_, err), (_, lo), (_, hi) in zip(
        history["llc/mean"], history["llc/stderr"], history["llc/lower"], history["llc/upper"],
        strict=True,
    ):
        assert lo == pytest.approx(mean - err) and hi == pytest.approx(mean + err)
    assert [s for s, _ in cb.results] == [0, 3, 7]


def test_training_is_not_disturbed(tmp_path):
    """Same seed with and without the callback: same weights, same RNG stream, same flags/mode."""
    probe = Probe()
    cb = LLCCallback(_data(), mse, at([2, 5]), calibrate=False, model_getter=lambda m: m.net,
                     **LLC_KWARGS)
    with_cb, rng_with = _fit(tmp_path, [cb, probe])
    without, rng_without = _fit(tmp_path, [])
    for (name, a), (_, b) in zip(with_cb.state_dict().items(), without.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(rng_with, rng_without)
    assert all(training and not frozen_grad and net_grad
               for _, training, frozen_grad, net_grad in probe.seen)
    assert len(cb.results) == 3


def test_the_whole_lightning_module_can_be_the_model(tmp_path):
    """Default model_getter: the LightningModule itself (copied without its trainer)."""
    cb = LLCCallback(_data(), lambda m, b: mse(m.net, b), at([4]), calibrate=False, **LLC_KWARGS)
    _fit(tmp_path, [cb], steps=4)
    assert [s for s, _ in cb.results] == [0, 4]
    assert cb.results[-1][1].config.num_params == sum(p.numel() for p in Regression().net.parameters())


# --- calibration: done once, reused, kept across a resume --------------------------------------
@dataclass(frozen=True)
class FakeCalibration:
    step_size: float

    def to_dict(self):
        return {"step_size": self.step_size}

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def _fake_calibration(monkeypatch):
    calls = []

    def calibrate(model, data, loss_fn, *, seed=0, num_chains=4):
        calls.append(seed)
        return FakeCalibration(step_size=2e-3)

    used = []
    real_estimate = llc_module.estimate_llc

    def estimate(model, data, loss_fn, *, calibration=None, **kwargs):
        used.append(calibration)
        if calibration is not None:
            kwargs.setdefault("step_size", calibration.step_size)
        return real_estimate(model, data, loss_fn, **kwargs)

    fake = types.SimpleNamespace(calibrate=calibrate, Calibration=FakeCalibration)
    monkeypatch.setattr(llc_module, "_calibration_module", lambda: fake)
    monkeypatch.setattr(llc_module, "estimate_llc", estimate)
    return calls, used


def test_calibration_once_then_reused_and_kept_on_resume(tmp_path, monkeypatch):
    calls, used = _fake_calibration(monkeypatch)
    kwargs = {k: v for k, v in LLC_KWARGS.items() if k != "step_size"}
    cb = LLCCallback(_data(), mse, at([2, 4, 6]), model_getter=lambda m: m.net, **kwargs)
    trainers = []
    _fit(tmp_path, [cb], steps=4, trainer_out=trainers)
    assert calls == [0]  # once, at the first estimate (step 0)
    assert used == [FakeCalibration(2e-3)] * 3
    assert all(r.config.step_size == 2e-3 for _, r in cb.results)
    ckpt = tmp_path / "run.ckpt"
    trainers[0].save_checkpoint(ckpt)

    resumed = LLCCallback(_data(), mse, at([2, 4, 6]), model_getter=lambda m: m.net, **kwargs)
    _fit(tmp_path, [resumed], steps=6, ckpt_path=ckpt)
    assert calls == [0], "a resumed run must reuse the saved calibration"
    assert resumed.calibration == FakeCalibration(2e-3)
    assert [s for s, _ in resumed.results] == [6]  # step 4 was done before; no step 0 again


def test_a_given_calibration_is_used_and_explicit_step_size_skips_calibration(tmp_path, monkeypatch):
    calls, used = _fake_calibration(monkeypatch)
    kwargs = {k: v for k, v in LLC_KWARGS.items() if k != "step_size"}
    cb = LLCCallback(_data(), mse, at([2]), calibrate=FakeCalibration(5e-4),
                     model_getter=lambda m: m.net, **kwargs)
    _fit(tmp_path, [cb], steps=2)
    assert calls == [] and used == [FakeCalibration(5e-4)] * 2
    explicit = LLCCallback(_data(), mse, at([2]), model_getter=lambda m: m.net, **LLC_KWARGS)
    _fit(tmp_path, [explicit], steps=2)
    assert calls == [] and explicit.calibration is None


def test_bad_arguments_raise_early():
    with pytest.raises(InvalidInputError, match="unknown estimate_llc argument"):
        LLCCallback(_data(), mse, calibrate=False, num_chain=2)
    with pytest.raises(InvalidInputError, match="loss_fn"):
        LLCCallback(_data(), 42, calibrate=False)  # None means lm_loss
    with pytest.raises(InvalidInputError, match="schedule"):
        LLCCallback(_data(), mse, [1, 2], calibrate=False)
    with pytest.raises(InvalidInputError, match="on_divergence"):
        LLCCallback(_data(), mse, calibrate=False, on_divergence="ignore")
    with pytest.raises(InvalidInputError, match="calibrate must be"):
        LLCCallback(_data(), mse, calibrate="yes")
    if not llc_module.calibration_available():
        with pytest.raises(InvalidInputError, match="explicit hyper-parameters"):
            LLCCallback(_data(), mse)


def test_a_diverging_estimate_is_skipped_with_a_warning(tmp_path):
    cb = LLCCallback(_data(), mse, at([2]), calibrate=False, model_getter=lambda m: m.net,
                     **{**LLC_KWARGS, "step_size": 1e3})
    with pytest.warns(RuntimeWarning, match="skipped"):
        _fit(tmp_path, [cb], steps=2)
    assert cb.results == []


def test_real_calibration_once_and_published(tmp_path, monkeypatch):
    calibration = pytest.importorskip("devinterp.analyses.calibration")
    calls = []
    real = calibration.calibrate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", spy)
    cb = LLCCallback(_data(), mse, at([3]), model_getter=lambda m: m.net, num_chains=2,
                     batch_size=32, seed=1,
                     calibrate_kwargs=dict(num_steps=100, min_draws=40, max_draws=60,
                                           min_burnin=20, max_burnin=40, target_ess=40))
    trainers = []
    _fit(tmp_path, [cb], steps=3, trainer_out=trainers)
    assert len(calls) == 1 and calls[0]["seed"] == 1 and calls[0]["batch_size"] == 32
    cal = cb.calibration
    assert [s for s, _ in cb.results] == [0, 3]
    for _, r in cb.results:
        assert r.config.step_size == cal.step_size and r.config.num_draws == cal.num_draws
    history = metric_history(trainers[0])
    assert history["calibration/step_size"] == [(0, cal.step_size)]
    restored = LLCCallback(_data(), mse, model_getter=lambda m: m.net, num_chains=2)
    restored.load_state_dict(cb.state_dict())
    assert restored.calibration.to_dict() == cal.to_dict()


# --- calibrate_at: estimates before it are deferred, then published with their own steps ------
class WeightsAt(pl.Callback):
    """Records a copy of the network's weights at training start and after every step."""

    def __init__(self):
        self.weights = {}

    def _keep(self, trainer, pl_module):
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self._keep(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep(trainer, pl_module)


CAL_KWARGS = dict(num_steps=100, min_draws=40, max_draws=60, min_burnin=20, max_burnin=40,
                  target_ess=40)


def test_calibrate_at_defers_then_publishes_in_order_with_the_one_calibration(tmp_path, monkeypatch):
    calibration = pytest.importorskip("devinterp.analyses.calibration")
    from devinterp.analyses import estimate_llc

    calls = []
    real = calibration.calibrate

    def spy(model, *args, **kwargs):
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", spy)
    weights = WeightsAt()
    cb = LLCCallback(_data(), mse, at([2, 3, 5]), model_getter=lambda m: m.net, num_chains=2,
                     batch_size=32, seed=1, calibrate_kwargs=CAL_KWARGS, calibrate_at=3)
    trainers = []
    _, rng_with = _fit(tmp_path, [weights, cb], steps=5, trainer_out=trainers)
    assert len(calls) == 1 and cb.calibrated_at == 3
    for name, value in calls[0].items():  # calibrated on the weights at step 3
        assert torch.equal(value, weights.weights[3][name]), name
    history = metric_history(trainers[0])
    assert [s for s, _ in history["llc/mean"]] == [0, 2, 3, 5]
    assert [s for s, _ in cb.results] == [0, 2, 3, 5]
    assert history["calibration/step_size"] == [(3, cb.calibration.step_size)]
    assert cb.state_dict()["deferred"] == []
    for step, result in cb.results:  # = estimate_llc on the weights of that step, same seed
        net = Regression().net
        net.load_state_dict(weights.weights[step])
        expected = estimate_llc(net.eval(), _data(), mse, calibration=cb.calibration, num_chains=2,
                                batch_size=32, seed=1)
        assert result.config.step_size == cb.calibration.step_size
        assert result.scalars()["llc/mean"] == pytest.approx(expected.scalars()["llc/mean"], rel=1e-6)
    # training is not disturbed: same weights and global RNG stream as without the callback
    without, rng_without = _fit(tmp_path, [], steps=5)
    final = trainers[0].lightning_module
    for (name, a), (_, b) in zip(final.state_dict().items(), without.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(rng_with, rng_without)


def test_calibrate_at_after_the_end_calibrates_on_the_final_weights(tmp_path, monkeypatch):
    calls, used = _fake_calibration(monkeypatch)
    kwargs = {k: v for k, v in LLC_KWARGS.items() if k != "step_size"}
    cb = LLCCallback(_data(), mse, at([1, 3]), model_getter=lambda m: m.net, calibrate_at=100,
                     **kwargs)
    trainers = []
    _fit(tmp_path, [cb], steps=4, trainer_out=trainers)
    assert calls == [0] and cb.calibrated_at == 4
    assert used == [FakeCalibration(2e-3)] * 3
    assert [s for s, _ in metric_history(trainers[0])["llc/mean"]] == [0, 1, 3]


class SaveAt(pl.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_deferred_estimates_survive_a_resume(tmp_path, monkeypatch):
    calls, used = _fake_calibration(monkeypatch)
    kwargs = {k: v for k, v in LLC_KWARGS.items() if k != "step_size"}
    ckpt = tmp_path / "mid.ckpt"
    first = LLCCallback(_data(), mse, at([2, 4, 6]), model_getter=lambda m: m.net, calibrate_at=4,
                        **kwargs)
    _fit(tmp_path, [first, SaveAt(2, ckpt)], steps=6)
    assert calls == [0] and first.calibrated_at == 4
    resumed = LLCCallback(_data(), mse, at([2, 4, 6]), model_getter=lambda m: m.net, calibrate_at=4,
                          **kwargs)
    trainers = []
    _fit(tmp_path, [resumed], steps=6, ckpt_path=ckpt, trainer_out=trainers)
    assert calls == [0, 0] and resumed.calibrated_at == 4
    assert [s for s, _ in resumed.results] == [0, 2, 4, 6]  # steps 0 and 2 came with the checkpoint
    # the deferred weights are restored exactly (later steps differ: the shuffled loader's order is
    # not part of a mid-epoch checkpoint)
    for (s, a), (t, b) in zip(first.results[:2], resumed.results[:2], strict=True):
        assert s == t and a.scalars()["llc/mean"] == pytest.approx(b.scalars()["llc/mean"], rel=1e-9)


def test_calibrate_at_must_be_a_non_negative_step():
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(InvalidInputError, match="calibrate_at"):
            LLCCallback(_data(), mse, calibrate=False, calibrate_at=bad)


# --- recalibrate: a reused step size whose acceptance fell below the band -----------------------
class AtMinimum(pl.LightningModule):
    """A deep linear network at its teacher (a true minimum), trained with lr = 0: every snapshot
    is the same minimum, so a misfit can only come from the calibration reused on it."""

    def __init__(self, net: nn.Module, loss_fn):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def training_step(self, batch, batch_idx):
        return self.loss_fn(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.0)


def _misfit_run(tmp_path, monkeypatch, **callback_kwargs):
    """A fit whose first calibration (at step 0) has 10× the step size the calibration chose
    (MALA acceptance 0.53 on this network: below the reuse band), estimates at 0, 2 and 4.

    Returns the callback, the calibrations made (with the step sizes they were given), every
    estimate made (published or not) and the Python warnings emitted.
    """
    import copy
    import warnings
    from dataclasses import replace

    calibration = pytest.importorskip("devinterp.analyses.calibration")
    from devinterp.analyses.theory import make_dln_problem

    p = make_dln_problem([4, 5, 6, 4], 1, 500, seed=0, noise_std=0.0)
    real_calibrate, real_estimate = calibration.calibrate, llc_module.estimate_llc
    made, estimates = [], []

    def spy_calibrate(*args, **kwargs):
        cal = real_calibrate(*args, **kwargs)
        if not made:  # as if made where the loss was flatter
            cal = replace(cal, step_size=10 * cal.step_size)
        made.append((kwargs.get("step_sizes"), cal))
        return cal

    def spy_estimate(*args, **kwargs):
        estimates.append(real_estimate(*args, **kwargs))
        return estimates[-1]

    monkeypatch.setattr(calibration, "calibrate", spy_calibrate)
    monkeypatch.setattr(llc_module, "estimate_llc", spy_estimate)
    cb = LLCCallback(p.data, p.loss_fn, at([2, 4]), model_getter=lambda m: m.net, recalibrate=True,
                     seed=0, budget=EST_BUDGET, progress=False,
                     calibrate_kwargs=dict(num_steps=60, grid_size=3, max_burnin=100, max_draws=100,
                                           min_burnin=50, min_draws=50, budget=CAL_BUDGET),
                     **callback_kwargs)
    module = AtMinimum(copy.deepcopy(p.model), p.loss_fn)
    loader = DataLoader(TensorDataset(*p.data), batch_size=100)
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return cb, made, estimates, caught


CAL_BUDGET, EST_BUDGET = 1500, 600


def _reuse_texts(texts):
    return sorted(t for t in texts if "reused calibration" in t)


def test_recalibrates_a_reused_step_size_with_acceptance_below_the_band_within_the_budget(tmp_path,
                                                                                          monkeypatch):
    cb, made, estimates, caught = _misfit_run(tmp_path, monkeypatch)
    inflated = made[0][1]
    # its first estimate (on the calibration's own snapshot) reads an acceptance below the band
    assert estimates[0].config.step_size == inflated.step_size
    assert estimates[0].diagnostics.acceptance < 0.6
    # ... so it was calibrated again at once, on smaller step sizes only, before anything was
    # published; each recalibration below the band starts below the step size before it
    assert cb.recalibrated_at[0] == 0 and made[1][0] is not None
    assert 1 <= len(cb.recalibrated_at) <= cb.max_recalibrations == 3
    assert len(made) == 1 + len(cb.recalibrated_at)
    for (_, before), (grid, after) in zip(made, made[1:], strict=False):
        if grid is not None:
            assert max(grid) < before.step_size and after.step_size < before.step_size
    # one published estimate per step, none at the step size that did not fit; the last fits
    assert [s for s, _ in cb.results] == [0, 2, 4]
    assert all(r.config.step_size < inflated.step_size for _, r in cb.results)
    last = cb.results[-1][1]
    assert last.config.step_size == cb.calibration.step_size
    assert 0.6 <= last.diagnostics.acceptance <= 0.995 and not _reuse_texts(last.warnings)
    # the discarded estimates' Python warnings never reach the user: what is emitted is exactly
    # what is published
    assert _reuse_texts(str(w.message) for w in caught) == _reuse_texts(
        w for _, r in cb.results for w in r.warnings)
    # within the budget: every calibration and every estimate, the discarded ones too
    for _, cal in made:
        assert 0 < cal.cost <= CAL_BUDGET and cal.budget == CAL_BUDGET
    assert all(0 < r.cost <= EST_BUDGET for r in estimates)
    assert len(estimates) == 3 + len(cb.recalibrated_at)
    # recalibrations are counted across a resume; none is made past max_recalibrations
    restored = LLCCallback(cb.data, cb.loss_fn, recalibrate=True,
                           max_recalibrations=len(cb.recalibrated_at))
    restored.load_state_dict(cb.state_dict())
    assert restored.recalibrated_at == cb.recalibrated_at
    restored.calibration = inflated
    assert restored._misfit(estimates[0], 100) is None
    restored.max_recalibrations += 1
    assert "acceptance" in restored._misfit(estimates[0], 100)


def test_without_recalibrations_left_the_misfit_is_published_with_its_warning(tmp_path, monkeypatch):
    cb, made, estimates, caught = _misfit_run(tmp_path, monkeypatch, max_recalibrations=0)
    assert len(made) == 1 and cb.recalibrated_at == [] and len(estimates) == 3
    assert [s for s, _ in cb.results] == [0, 2, 4]
    for _, r in cb.results:  # published as they are: the warning says what to do
        assert r.diagnostics.acceptance < 0.6 and _reuse_texts(r.warnings)
    assert len(_reuse_texts(str(w.message) for w in caught)) == 3


def test_refit_step_sizes_only_below_the_band():
    from types import SimpleNamespace

    calibration = pytest.importorskip("devinterp.analyses.calibration")

    def result(acc):
        return SimpleNamespace(diagnostics=SimpleNamespace(acceptance=acc))

    cal = SimpleNamespace(step_size=1e-3)
    lo, hi = calibration.REUSE_ACCEPTANCE_BAND
    grid = calibration.refit_step_sizes(result(lo - 0.01), cal)
    assert grid == pytest.approx([5e-4, 2.5e-4, 1.25e-4, 6.25e-5][:calibration.REFIT_LEVELS])
    assert calibration.refit_step_sizes(result(lo - 0.01), cal, [4e-3, 1e-3, 3e-4, 1e-4]) == [3e-4, 1e-4]
    assert calibration.refit_step_sizes(result(lo - 0.01), cal, [4e-3]) == pytest.approx(grid)
    for fits in (lo, 0.8, hi, 1.0, float("nan")):  # in the band, too high or unknown: usual grid
        assert calibration.refit_step_sizes(result(fits), cal) is None


def test_max_recalibrations_must_be_a_non_negative_int():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(InvalidInputError, match="max_recalibrations"):
            LLCCallback(_data(), mse, calibrate=False, max_recalibrations=bad)


# --- deferred estimates get the recalibration too; too-short chains are made longer -------------
class Sharp(nn.Module):
    """A network with a loss multiplier ``sharp`` (a buffer, so part of every snapshot): at
    ``sharp = 12`` the same minimum is 12× as curved, so a step size fitted at ``sharp = 1``
    reads an acceptance below the band there (0.58 at 10×, 0.50 at 15×)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("sharp", torch.tensor(1.0))

    def forward(self, x):
        return self.inner(x)


class SharpUntil(pl.Callback):
    """Listed before LLCCallback: the net is sharp (×12) at step 0 only."""

    def on_train_start(self, trainer, pl_module):
        pl_module.net.sharp.fill_(12.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.net.sharp.fill_(1.0)


def _dln_run(tmp_path, monkeypatch, callbacks_before=(), cal_kwargs=None, **callback_kwargs):
    """A fit of a deep linear network at its teacher (lr = 0, estimates at 0, 2 and 4), its
    calibrations and every estimate made (published or not) recorded; returns them with the
    Python warnings emitted."""
    import copy
    import warnings

    calibration = pytest.importorskip("devinterp.analyses.calibration")
    from devinterp.analyses.theory import make_dln_problem

    p = make_dln_problem([4, 5, 6, 4], 1, 500, seed=0, noise_std=0.0)
    real_calibrate, real_estimate = calibration.calibrate, llc_module.estimate_llc
    made, estimates = [], []

    def spy_calibrate(model, *args, **kwargs):
        kwargs = llc_module._accepted(real_calibrate, kwargs)
        made.append((float(model.sharp), kwargs.get("step_sizes"), real_calibrate(model, *args,
                                                                                  **kwargs)))
        return made[-1][2]

    def spy_estimate(*args, **kwargs):
        estimates.append(real_estimate(*args, **kwargs))
        return estimates[-1]

    def loss(model, batch):
        return model.sharp * p.loss_fn(model.inner, batch)

    monkeypatch.setattr(calibration, "calibrate", spy_calibrate)
    monkeypatch.setattr(llc_module, "estimate_llc", spy_estimate)
    callback_kwargs = {"recalibrate": True, "budget": EST_BUDGET, **callback_kwargs}
    cb = LLCCallback(p.data, loss, at([2, 4]), model_getter=lambda m: m.net, seed=0,
                     progress=False,
                     calibrate_kwargs={**dict(num_steps=60, grid_size=3, max_burnin=100,
                                              max_draws=100, min_burnin=50, min_draws=50,
                                              budget=CAL_BUDGET), **(cal_kwargs or {})},
                     **callback_kwargs)
    module = AtMinimum(Sharp(copy.deepcopy(p.model)), loss)
    loader = DataLoader(TensorDataset(*p.data), batch_size=100)
    trainer = pl.Trainer(max_steps=4, callbacks=[*callbacks_before, cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return cb, made, estimates, caught, trainer


def test_a_deferred_snapshot_the_calibration_does_not_fit_is_recalibrated_on_its_own(tmp_path,
                                                                                     monkeypatch):
    cb, made, estimates, caught, trainer = _dln_run(tmp_path, monkeypatch, [SharpUntil()],
                                                    calibrate_at=2, num_acceptance_checks=16)
    main = made[0][2]
    assert made[0][0] == 1.0 and cb.calibrated_at == 2  # calibrated at step 2 (not sharp)
    # the deferred step 0 (12× sharper) read an acceptance below the band with it ...
    first0 = estimates[1]
    assert first0.config.step_size == main.step_size and first0.diagnostics.acceptance < 0.6
    # ... so it was estimated again at half the step size (its own pilots are not asked: no
    # calibration on it), halved again while still below the band
    assert cb.recalibrated_at[0] == 0 and set(cb.recalibrated_at) == {0}
    assert len(made) == 1 and 1 <= len(cb.recalibrated_at) <= cb.max_recalibrations
    published = dict(cb.results)
    assert [s for s, _ in cb.results] == [0, 2, 4]
    kept0 = published[0]
    assert kept0.config.step_size == pytest.approx(main.step_size / 2 ** len(cb.recalibrated_at))
    assert (kept0.config.num_burnin, kept0.config.num_draws) == (main.num_burnin, main.num_draws)
    assert 0.6 <= kept0.diagnostics.acceptance <= 0.995 and not _reuse_texts(kept0.warnings)
    assert len(estimates) == 3 + len(cb.recalibrated_at) + len(cb.extended_at)
    # the calibration made at calibrate_at is restored for its own step and the later ones
    assert cb.calibration is main and cb.state_dict()["calibration"] == main.to_dict()
    assert published[2].config.step_size == published[4].config.step_size == main.step_size
    history = metric_history(trainer)["calibration/step_size"]
    assert (0, kept0.config.step_size) in history and (2, main.step_size) in history
    # what is emitted is exactly what is published: the discarded estimate's warnings held back
    assert _reuse_texts(str(w.message) for w in caught) == _reuse_texts(
        w for _, r in cb.results for w in r.warnings)
    assert all(0 < r.cost <= EST_BUDGET for r in estimates)


def test_deferred_misfits_are_published_with_their_warning_without_recalibrations_left(
        tmp_path, monkeypatch):
    cb, made, estimates, caught, _ = _dln_run(tmp_path, monkeypatch, [SharpUntil()],
                                              calibrate_at=2, max_recalibrations=0,
                                              num_acceptance_checks=16)
    assert len(made) == 1 and cb.recalibrated_at == []
    kept0 = dict(cb.results)[0]
    assert kept0.diagnostics.acceptance < 0.6 and _reuse_texts(kept0.warnings)
    assert len(_reuse_texts(str(w.message) for w in caught)) == 1


def test_chains_too_short_for_the_snapshot_are_made_longer_within_the_budget(tmp_path, monkeypatch):
    from devinterp.analyses import llc as llc_analysis

    # calibrated chains of 10 draws: an effective sample size below ESS_WARN (40) at every step
    cb, made, estimates, caught, _ = _dln_run(
        tmp_path, monkeypatch, max_extensions=2,
        cal_kwargs=dict(min_burnin=5, max_burnin=5, min_draws=10, max_draws=10, target_ess=10))
    cal = cb.calibration
    assert (cal.num_burnin, cal.num_draws) == (5, 10) and cb.recalibrated_at == []
    assert estimates[0].diagnostics.ess < llc_analysis.ESS_WARN
    # steps 0 and 2 were made again with twice the burn-in and draws (same step size); step 4,
    # past max_extensions, is published as it is, with its warning
    assert cb.extended_at == [0, 2] and len(estimates) == 3 + 2
    lengths = {s: (r.config.num_burnin, r.config.num_draws) for s, r in cb.results}
    assert lengths == {0: (10, 20), 2: (10, 20), 4: (5, 10)}
    assert all(r.config.step_size == cal.step_size for _, r in cb.results)
    assert any(w.startswith("effective sample size") for w in dict(cb.results)[4].warnings)
    assert all(0 < r.cost <= EST_BUDGET for r in estimates)
    # counted across a resume
    restored = LLCCallback(cb.data, cb.loss_fn, recalibrate=True)
    restored.load_state_dict(cb.state_dict())
    assert restored.extended_at == [0, 2]


def test_longer_chains_only_where_they_fit_the_budget_and_not_for_explicit_lengths(tmp_path,
                                                                                   monkeypatch):
    cal_kwargs = dict(min_burnin=5, max_burnin=5, min_draws=10, max_draws=10, target_ess=10)
    cb, _, estimates, _, _ = _dln_run(tmp_path, monkeypatch, cal_kwargs=cal_kwargs,
                                      budget=estimates_cost(tmp_path, monkeypatch, cal_kwargs))
    assert cb.extended_at == [] and len(estimates) == 3
    monkeypatch.undo()
    cb, _, estimates, _, _ = _dln_run(tmp_path, monkeypatch, cal_kwargs=cal_kwargs, num_draws=10)
    assert cb.extended_at == [] and len(estimates) == 3
    monkeypatch.undo()
    cb, _, estimates, _, _ = _dln_run(tmp_path, monkeypatch, cal_kwargs=cal_kwargs,
                                      recalibrate=False)
    assert cb.extended_at == [] and len(estimates) == 3


def estimates_cost(tmp_path, monkeypatch, cal_kwargs):
    """The cost of one short estimate: a budget with no room for a longer one."""
    cb, _, estimates, _, _ = _dln_run(tmp_path, monkeypatch, cal_kwargs=cal_kwargs,
                                      max_extensions=0)
    monkeypatch.undo()
    return max(r.cost for r in estimates)


def test_max_extensions_must_be_a_non_negative_int():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(InvalidInputError, match="max_extensions"):
            LLCCallback(_data(), mse, calibrate=False, max_extensions=bad)
