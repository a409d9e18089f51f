"""The default budget of ``estimate_llc``: counted forward passes, the warning when it binds, the
progress bar and the plan announced on stderr."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from devinterp.analyses import estimate_llc
from devinterp.analyses.budget import DEFAULT_BUDGET, Meter, fit_lengths
from devinterp.analyses.theory import make_dln_problem
from devinterp.errors import InvalidInputError
from tests.client_models import needs_hf, tiny_gpt2

#: forward passes of the counted model, shared by every copy a sampler makes of it
CALLS = [0]


class _Counting(nn.Module):
    """An HF causal LM whose every forward pass is counted in ``CALLS``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, tokens):
        CALLS[0] += 1
        return self.inner(input_ids=tokens).logits


def _token_loss(model, batch):
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    logits = model(tokens)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       tokens[:, 1:].reshape(-1))


def _transformer():
    inner = tiny_gpt2(n_layers=2, d_model=64, n_heads=4, n_ctx=16, seed=0)
    model = _Counting(inner).eval()
    num_params = sum(p.numel() for p in model.parameters())
    assert 90_000 <= num_params <= 130_000, num_params
    gen = torch.Generator().manual_seed(0)
    return model, TensorDataset(torch.randint(0, 24, (64, 8), generator=gen))


def _check_within(res, budget, capfd):
    assert CALLS[0] <= budget, CALLS[0]
    assert CALLS[0] <= res.cost <= budget, (res.cost, CALLS[0])
    err = capfd.readouterr().err
    assert "calibrate:" in err and "chains ×" in err and "step_size=" in err, err[-2000:]
    assert "eval" in err and "estimate_llc" in err, err[-2000:]  # the tqdm bar and its ETA
    assert "<" in err and "/s" in err or "s/eval" in err, err[-2000:]
    text = [w for w in res.warnings if "budget of" in w]
    for t in text:  # when the budget binds, the warning says what was reached and what is needed
        assert "effective sample size" in t and "stderr" in t and "budget=" in t, t
        assert int(t.rsplit("budget=", 1)[1].split()[0]) > budget
    return text


@needs_hf
def test_a_100k_transformer_within_a_small_budget_counts_forward_passes(capfd):
    model, data = _transformer()
    CALLS[0] = 0
    res = estimate_llc(model, data, _token_loss, seed=0, batch_size=8, budget=800,
                       progress=True)
    _check_within(res, 800, capfd)
    # a reused calibration with a budget that cannot hold its lengths: the warning names the ESS
    CALLS[0] = 0
    small = estimate_llc(model, data, _token_loss, seed=1, batch_size=8,
                         calibration=res.calibration, budget=200, progress=False)
    assert CALLS[0] <= small.cost <= 200
    text = [w for w in small.warnings if "budget of" in w]
    assert text, small.warnings
    assert "effective sample size" in text[0] and "stderr" in text[0] and "budget=" in text[0]
    assert small.config.num_chains * (small.config.num_burnin + small.config.num_draws) <= 200


@pytest.mark.slow
@needs_hf
def test_default_estimate_of_a_100k_transformer_stays_within_the_default_budget(capfd):
    model, data = _transformer()
    CALLS[0] = 0
    res = estimate_llc(model, data, _token_loss, seed=0, batch_size=32, progress=True)
    _check_within(res, DEFAULT_BUDGET, capfd)


def test_budget_on_a_small_network_and_explicit_lengths_win():
    p = make_dln_problem([4, 5, 6, 4], 1, 2000, seed=0, noise_std=0.0)
    r = estimate_llc(p.model, p.data, p.loss_fn, step_size=1e-4, seed=0, budget=1000,
                     progress=False)
    assert r.cost <= 1000 and any("effective sample size" in w for w in r.warnings)
    assert r.config.num_chains >= 2
    r2 = estimate_llc(p.model, p.data, p.loss_fn, step_size=1e-4, seed=0, budget=1000,
                      num_chains=2, num_draws=600, num_burnin=100, progress=False)
    assert (r2.config.num_draws, r2.config.num_burnin) == (600, 100)
    assert not any("budget" in w for w in r2.warnings)
    r3 = estimate_llc(p.model, p.data, p.loss_fn, step_size=1e-4, seed=0, budget=None,
                      progress=False)
    assert (r3.config.num_chains, r3.config.num_draws) == (4, 800) and r3.cost > 4800
    with pytest.raises(InvalidInputError, match="budget"):
        estimate_llc(p.model, p.data, p.loss_fn, step_size=1e-4, budget=0)


def test_fit_lengths_prefers_fewer_longer_chains_and_keeps_the_burnin():
    assert fit_lengths(4, 100, 400, 5000) == (4, 100, 400)
    c, b, d = fit_lengths(4, 1500, 1000, 5000, check_fraction=0.0)
    assert b == 1500 and c * (b + d) <= 5000 and c == 2 and d == 1000
    c, b, d = fit_lengths(4, 4000, 1000, 5000, check_fraction=0.0)
    assert c == 2 and b < 4000 and c * (b + d) <= 5000 and d >= 1
    assert fit_lengths(4, 100, 400, math.inf) == (4, 100, 400)


def test_meter_counts_and_stays_quiet_without_a_terminal(capsys):
    m = Meter(100, progress=None)
    with m:
        m.add(30)
        m.say("nothing")
    assert m.used == 30 and m.remaining() == 70
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal


def test_llc_callback_recalibrates_only_later_snapshots_whose_calibration_no_longer_fits():
    from dataclasses import replace

    from devinterp.analyses.calibration import calibrate
    from devinterp.callbacks import LLCCallback

    p = make_dln_problem([4, 5, 6, 4], 1, 2000, seed=0, noise_std=0.0)
    cal = calibrate(p.model, p.data, p.loss_fn, seed=0, num_steps=60, grid_size=3,
                    max_burnin=200, max_draws=200, progress=False)
    tiny = replace(cal, step_size=cal.step_size / 1000)  # MALA acceptance ≈ 1: no longer fits
    res = estimate_llc(p.model, p.data, p.loss_fn, calibration=tiny, seed=0, progress=False)
    assert res.diagnostics.acceptance > 0.995
    cb = LLCCallback(p.data, p.loss_fn, recalibrate=True, progress=False)
    cb.calibration, cb.calibrated_at = tiny, 100
    assert cb._misfit(res, 200) and "acceptance" in cb._misfit(res, 200)
    assert cb._misfit(res, 50) is None  # an earlier step, outside the deferred estimates: none
    cb._main = (tiny, 100)  # while the deferred estimates are made (_flush_deferred): they are
    assert cb._misfit(res, 50) and "acceptance" in cb._misfit(res, 50)
    assert LLCCallback(p.data, p.loss_fn)._misfit(res, 200) is None  # default: once
