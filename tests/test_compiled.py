"""The compiled SGLD step: the deterministic auto rule, eager fallback, agreement with eager."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from devinterp.analyses import compiled, estimate_llc
from devinterp.analyses.sampling import prepare_target, sample_chains
from devinterp.analyses.theory import make_dln_problem, make_rrr_problem
from devinterp.errors import InvalidInputError

FAST = dict(num_chains=2, num_draws=60, num_burnin=20, step_size=1e-4, batch_size=64)


@pytest.fixture(scope="module")
def problem():
    return make_rrr_problem(4, 2, 3, 1, 512, seed=0)


@pytest.fixture()
def fresh_cache(monkeypatch):
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(compiled, "_FAILED", set())
    monkeypatch.setattr(compiled, "_WARNED", set())


def _dln_target():
    p = make_dln_problem([10] * 5, 5, 2000, seed=0)
    return prepare_target(p.model, p.data, p.loss_fn, batch_size=500)


def _mlp_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    x, y = torch.randn(512, 784), torch.randint(0, 10, (512,))
    return prepare_target(model, (x, y),
                          lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                          batch_size=256)


def test_auto_rule_is_static_and_weighs_planned_work():
    dln, mlp = _dln_target(), _mlp_target()
    rule = dict(chains=4, num_steps=1500, sampler="sgld")
    # one estimate never pays for a compile; many estimates of an overhead-bound model do
    assert not compiled.should_compile(dln, expected_calls=1, **rule)
    assert compiled.should_compile(dln, expected_calls=200, **rule)
    # break-even in between, and monotone in the planned work
    calls = [c for c in range(1, 201) if compiled.should_compile(dln, expected_calls=c, **rule)]
    assert calls == list(range(calls[0], 201))
    info = compiled.describe_rule(dln, 4, 1500, 1)
    assert calls[0] == info["break_even_calls"] or calls[0] == info["break_even_calls"] + 1
    # an MLP dominated by matrix work: never, however many calls
    assert not compiled.should_compile(mlp, expected_calls=10**6, **rule)
    # samplers without a compiled step: never
    assert not compiled.should_compile(dln, expected_calls=10**6, chains=4, num_steps=1500,
                                       sampler="sgnht")
    # the same inputs, the same verdict (no timing involved)
    assert [compiled.should_compile(dln, expected_calls=40, **rule) for _ in range(3)] == \
        [compiled.should_compile(dln, expected_calls=40, **rule)] * 3


@pytest.mark.parametrize("bad", [dict(compile="yes"), dict(compile=1.0), dict(expected_calls=0),
                                 dict(expected_calls=2.5), dict(expected_calls=True)])
def test_bad_compile_options_rejected_early(problem, bad):
    with pytest.raises(InvalidInputError):
        estimate_llc(problem.model, problem.data, problem.loss_fn, **FAST, **bad)
    target = prepare_target(problem.model, problem.data, problem.loss_fn, batch_size=64)
    with pytest.raises(InvalidInputError):
        sample_chains(target, num_steps=5, step_size=1e-4, **bad)


def test_auto_with_one_call_is_the_eager_path_bitwise(problem):
    a = estimate_llc(problem.model, problem.data, problem.loss_fn, compile=False, **FAST)
    b = estimate_llc(problem.model, problem.data, problem.loss_fn, **FAST)
    assert not a.config.compiled and not b.config.compiled
    assert a.mean == b.mean and np.array_equal(a.loss_trace, b.loss_trace)


def test_unavailable_compile_falls_back_with_one_warning(problem, monkeypatch, fresh_cache):
    monkeypatch.setattr(compiled, "compile_available", lambda device: (False, "no compiler"))
    ref = estimate_llc(problem.model, problem.data, problem.loss_fn, compile=False, **FAST)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        a = estimate_llc(problem.model, problem.data, problem.loss_fn, compile=True, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once per process only
        estimate_llc(problem.model, problem.data, problem.loss_fn, compile=True, **FAST)
    assert not a.config.compiled
    assert np.array_equal(a.loss_trace, ref.loss_trace)


def test_failing_compile_never_fails_the_estimate(problem, monkeypatch, fresh_cache):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(compiled, "compile_available", lambda device: (True, ""))
    monkeypatch.setattr(torch, "compile", broken)
    ref = estimate_llc(problem.model, problem.data, problem.loss_fn, compile=False, **FAST)
    with pytest.warns(RuntimeWarning, match="inductor exploded"):
        a = estimate_llc(problem.model, problem.data, problem.loss_fn, compile=True, **FAST)
    assert not a.config.compiled
    assert np.array_equal(a.loss_trace, ref.loss_trace)
    # the failed structure is remembered: no second attempt, no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        b = estimate_llc(problem.model, problem.data, problem.loss_fn, compile=True, **FAST)
    assert np.array_equal(b.loss_trace, ref.loss_trace)


def test_non_sgld_sampler_with_compile_true_runs_eagerly(problem, fresh_cache):
    ref = estimate_llc(problem.model, problem.data, problem.loss_fn, sampler="sgnht",
                       compile=False, **FAST)
    with pytest.warns(RuntimeWarning, match="only the 'sgld' sampler"):
        a = estimate_llc(problem.model, problem.data, problem.loss_fn, sampler="sgnht",
                         compile=True, **FAST)
    assert np.array_equal(a.loss_trace, ref.loss_trace)


needs_compile = pytest.mark.skipif(not compiled.compile_available(torch.device("cpu"))[0],
                                   reason="torch.compile unavailable here: "
                                   + compiled.compile_available(torch.device("cpu"))[1])


@pytest.mark.slow
@needs_compile
def test_compiled_agrees_with_eager_and_is_reused_across_snapshots(fresh_cache):
    from torch._dynamo.utils import counters

    kw = dict(num_chains=3, num_draws=300, num_burnin=100, step_size=3e-5, batch_size=200,
              seed=5, num_acceptance_checks=4)
    def closure(problem):  # a new loss closure per snapshot, with the same code
        return lambda m, b: problem.loss_fn(m, b)

    p = make_dln_problem([4, 5, 6, 4], 1, 2000, seed=0)
    eager = estimate_llc(p.model, p.data, p.loss_fn, compile=False, **kw)
    fast = estimate_llc(p.model, p.data, closure(p), compile=True, **kw)
    assert fast.config.compiled and not eager.config.compiled
    # float reassociation only: λ̂ within 1e-4 relative, traces and acceptance allclose
    assert abs(fast.mean - eager.mean) <= 1e-4 * abs(eager.mean)
    assert np.allclose(fast.loss_trace, eager.loss_trace, rtol=1e-4, atol=1e-6)
    assert np.allclose(fast.diagnostics.acceptance, eager.diagnostics.acceptance, atol=1e-3)
    # same seed, same compiled result
    again = estimate_llc(p.model, p.data, closure(p), compile=True, **kw)
    assert np.array_equal(again.loss_trace, fast.loss_trace)
    graphs = counters["stats"]["unique_graphs"]
    # another snapshot (new instance, new weights, a new loss closure), other hyper-parameters:
    # the compiled step is reused without recompiling
    q = make_dln_problem([4, 5, 6, 4], 1, 2000, seed=1)
    other = estimate_llc(q.model, q.data, closure(q), compile=True,
                         **dict(kw, step_size=1e-5, localization=3.0, nbeta=500.0))
    assert other.config.compiled
    assert counters["stats"]["unique_graphs"] == graphs
    ref = estimate_llc(q.model, q.data, q.loss_fn, compile=False,
                       **dict(kw, step_size=1e-5, localization=3.0, nbeta=500.0))
    assert np.allclose(other.loss_trace, ref.loss_trace, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_compile
def test_compiled_masked_selection_agrees_with_eager(fresh_cache):
    p = make_dln_problem([4, 5, 4], 1, 1000, seed=2)
    names = [n for n, _ in p.model.named_parameters()]
    mask = {names[0]: torch.rand(p.model.get_parameter(names[0]).shape) > 0.5}
    kw = dict(num_chains=2, num_draws=200, num_burnin=50, step_size=3e-5, batch_size=100,
              params=mask, seed=1)
    eager = estimate_llc(p.model, p.data, p.loss_fn, compile=False, **kw)
    fast = estimate_llc(p.model, p.data, p.loss_fn, compile=True, **kw)
    assert fast.config.compiled
    assert np.allclose(fast.loss_trace, eager.loss_trace, rtol=1e-4, atol=1e-6)
    assert abs(fast.mean - eager.mean) <= 1e-4 * abs(eager.mean) + 1e-6
