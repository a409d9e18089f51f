import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp.analyses import LLCResult, estimate_llc
from devinterp.analyses.sampling import prepare_target, run_chains, sample_chains
from devinterp.analyses.theory import make_dln_problem, make_rrr_problem
from devinterp.errors import ChainDivergedError, InvalidInputError

FAST = dict(num_chains=2, num_draws=60, num_burnin=20, step_size=1e-4, batch_size=64)


@pytest.fixture(scope="module")
def problem():
    return make_rrr_problem(4, 2, 3, 1, 512, seed=0)


def test_same_seed_same_result_different_seed_differs(problem):
    a = estimate_llc(problem.model, problem.data, problem.loss_fn, seed=3, **FAST)
    b = estimate_llc(problem.model, problem.data, problem.loss_fn, seed=3, **FAST)
    c = estimate_llc(problem.model, problem.data, problem.loss_fn, seed=4, **FAST)
    assert a.mean == b.mean and np.array_equal(a.loss_trace, b.loss_trace)
    assert c.mean != a.mean


def test_result_fields_and_burnin_never_averaged(problem):
    r = estimate_llc(problem.model, problem.data, problem.loss_fn, **FAST)
    assert isinstance(r, LLCResult)
    assert r.loss_trace.shape == (2, 60) and r.burnin_trace.shape == (2, 20)
    nbeta = 512 / math.log(512)
    assert r.config.nbeta == pytest.approx(nbeta)
    expected = nbeta * (r.loss_trace.mean(axis=1) - r.init_loss)
    assert np.allclose(r.per_chain, expected)
    assert r.mean == pytest.approx(float(np.mean(expected)))
    assert r.stderr >= r.std / math.sqrt(2) - 1e-12
    s = r.scalars()
    assert {"llc/mean", "llc/std", "llc/stderr", "llc/rhat", "llc/ess",
            "llc/acceptance", "llc/frac_below_init"} <= set(s)
    assert all(isinstance(v, float) for v in s.values())
    with pytest.raises(AttributeError):
        r.mean = 0.0  # frozen
    with pytest.raises(ValueError):
        r.loss_trace[0, 0] = 1.0  # read-only
    assert 0.0 <= r.diagnostics.acceptance <= 1.0
    assert r.llc_trace().shape == (2, 60)


def test_model_weights_flags_mode_and_rng_untouched(problem):
    model = make_dln_problem([3, 4, 2], 1, 100).model
    model.eval()
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(100, 3), torch.randn(100, 2)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    for vec in (True, False):
        estimate_llc(model, (x, y), problem.loss_fn, vectorize=vec, **FAST)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == [True, False]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_zero_step_size_keeps_chains_at_anchor_and_batch_streams_differ(problem):
    target = prepare_target(problem.model, problem.data, problem.loss_fn, batch_size=32)
    tr = sample_chains(target, num_chains=3, num_steps=10, step_size=0.0)
    assert torch.equal(tr.final_params, target.anchor.expand(3, -1))
    # same parameters, own minibatch order: chains see different losses
    assert len({float(v) for v in tr.losses[:, 0]}) == 3
    full = prepare_target(problem.model, problem.data, problem.loss_fn, batch_size=10_000)
    tr = sample_chains(full, num_chains=3, num_steps=3, step_size=0.0)
    assert np.allclose(tr.losses, tr.init_loss)


@pytest.mark.parametrize("params", ["0.weight", ["0.*"], lambda n, p: n.startswith("0"),
                                    "masks"])
def test_params_selection_keeps_unselected_fixed(problem, params):
    model = problem.model
    if params == "masks":
        mask = torch.zeros_like(model[0].weight, dtype=torch.bool)
        mask[0, :2] = True
        params = {"0.weight": mask}
    target = prepare_target(model, problem.data, problem.loss_fn, params=params, batch_size=64)
    assert target.param_names == ("0.weight",)
    tr = sample_chains(target, num_chains=2, num_steps=20, step_size=1e-3)
    moved = (tr.final_params != target.anchor).any(0)
    if isinstance(params, dict):
        assert moved.view(model[0].weight.shape)[0, :2].all()
        assert int(moved.sum()) == 2 and target.num_selected == 2
    else:
        assert moved.all()
    r = estimate_llc(model, problem.data, problem.loss_fn, params=params, **FAST)
    assert r.config.param_names == ("0.weight",)


def test_vmap_and_loop_agree(problem):
    kw = dict(FAST, num_draws=30)
    a = estimate_llc(problem.model, problem.data, problem.loss_fn, vectorize=True, **kw)
    b = estimate_llc(problem.model, problem.data, problem.loss_fn, vectorize=False, **kw)
    assert a.config.mode == "vmap" and b.config.mode == "loop"
    assert np.allclose(a.loss_trace, b.loss_trace, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld", "sgnht"])
def test_every_sampler_gives_positive_finite_estimate(problem, sampler):
    step = {"sgld": 1e-4, "rmsprop_sgld": 1e-3, "sgnht": 1e-4}[sampler]
    r = estimate_llc(problem.model, problem.data, problem.loss_fn, sampler=sampler,
                     **dict(FAST, step_size=step, num_draws=200))
    assert math.isfinite(r.mean) and r.mean > 0
    if sampler == "sgnht":
        assert math.isnan(r.diagnostics.acceptance)


def test_dataset_and_dataloader_inputs(problem):
    x, y = problem.data
    ds = TensorDataset(x, y)
    r1 = estimate_llc(problem.model, ds, problem.loss_fn, **FAST)
    r2 = estimate_llc(problem.model, DataLoader(ds, batch_size=64), problem.loss_fn,
                      **{k: v for k, v in FAST.items() if k != "batch_size"})
    r3 = estimate_llc(problem.model, (x, y), problem.loss_fn, **FAST)
    assert r1.mean == r3.mean and r2.config.batch_size == 64 and r2.mean == r3.mean


def test_data_refined_uses_given_subset(problem):
    x, y = problem.data
    r = estimate_llc(problem.model, (x[:100], y[:100]), problem.loss_fn, **FAST)
    assert r.config.n == 100


def test_bfloat16_model(problem):
    model = make_rrr_problem(4, 2, 3, 1, 512, seed=0).model.to(torch.bfloat16)
    before = [p.clone() for p in model.parameters()]
    x, y = (t.to(torch.bfloat16) for t in problem.data)
    for vec in (True, False):
        r = estimate_llc(model, (x, y), problem.loss_fn, vectorize=vec, **FAST)
        assert math.isfinite(r.mean)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, b)
               for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_shapes_and_leaves_model_on_cpu(problem):
    r = estimate_llc(problem.model, problem.data, problem.loss_fn, device="cuda", **FAST)
    assert r.config.device.startswith("cuda") and math.isfinite(r.mean)
    assert next(problem.model.parameters()).device.type == "cpu"


def test_divergence_raises_with_chain_step_and_smaller_step(problem):
    with pytest.raises(ChainDivergedError) as err:
        estimate_llc(problem.model, problem.data, problem.loss_fn,
                     **dict(FAST, step_size=1.0))
    e = err.value
    assert e.chain is not None and e.step is not None and e.suggested_step_size < 1.0
    assert f"chain {e.chain}" in str(e) and "step_size=" in str(e)
    target = prepare_target(problem.model, problem.data, problem.loss_fn, batch_size=64)
    tr = sample_chains(target, num_chains=2, num_steps=50, step_size=1.0,
                       on_divergence="stop", check_every=5)
    assert tr.diverged and tr.losses.shape[1] == tr.diverged_step
    assert np.isfinite(tr.losses).all()


def test_run_chains_yields_every_step(problem):
    target = prepare_target(problem.model, problem.data, problem.loss_fn, batch_size=64)
    steps = [s for s, state, info in run_chains(target, num_chains=2, num_steps=7,
                                                step_size=1e-4, localization=1.0, nbeta=10.0,
                                                acceptance_steps=[3])
             if info.loss.shape == (2,) and state.params.shape == (2, target.dim)]
    assert steps == list(range(7))


# ---- bad input ------------------------------------------------------------------------------
def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("kwargs,match", [
    (dict(data=(torch.zeros(0, 3), torch.zeros(0, 2))), "empty"),
    (dict(loss_fn=lambda m, b: (m(b[0]) - b[1]) ** 2), "scalar"),
    (dict(loss_fn=lambda m, b: _loss(m, b) * float("nan")), "not finite"),
    (dict(num_draws=0), "num_draws"),
    (dict(params="nothing*"), "matches no parameter"),
    (dict(params=lambda n, p: False), "selected no parameter"),
    (dict(params={"weight": torch.zeros(2, 3, dtype=torch.bool)}), "no entry"),
    (dict(sampler="hmc"), "sampler"),
    (dict(step_size=-1.0), "step_size"),
    (dict(data=(torch.zeros(5, 3), torch.zeros(4, 2))), "disagree"),
    (dict(data=[1, 2, 3]), "tensors"),
])
def test_bad_input_is_rejected_early(kwargs, match):
    args = dict(model=nn.Linear(3, 2), data=(torch.randn(20, 3), torch.randn(20, 2)),
                loss_fn=_loss)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(InvalidInputError, match=match):
        estimate_llc(args["model"], args["data"], args["loss_fn"],
                     **{**FAST, "num_draws": 10, **kwargs})


def test_no_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(InvalidInputError, match="no trainable"):
        estimate_llc(model, (torch.randn(20, 3), torch.randn(20, 2)), _loss, **FAST)


def test_negative_estimate_warns():
    # w* far from the minimum: draws fall below L(w*)
    model = nn.Linear(3, 2)
    x = torch.randn(256, 3)
    y = x @ torch.randn(3, 2)
    r = estimate_llc(model, (x, y), _loss, **dict(FAST, step_size=1e-3))
    assert r.mean < 0
    assert any("negative" in w for w in r.warnings)
    assert any("below L(w*)" in w for w in r.warnings)


def _steps(target, **kw):
    out, last = [], None
    for _, state, info in run_chains(target, **kw):
        out.append((info.loss.clone(), info.correction.clone(), info.sampler_info.drift.clone(),
                    None if info.acceptance is None else info.acceptance.clone()))
        last = state.params
    return out, last.clone()


@pytest.mark.parametrize("case", ["minibatch", "full_batch", "mask", "per_chain_backward"])
def test_in_place_steps_match_the_kernel_bitwise(problem, case, monkeypatch):
    """sample_chains' in-place SGLD loop (reuse_buffers) gives the kernel path's numbers
    exactly: losses, corrections, drifts, MALA acceptances and final parameters."""
    from devinterp.analyses import sampling

    model, data, loss_fn = problem.model, problem.data, problem.loss_fn
    kw = dict(batch_size=64, vectorize=False)
    if case == "full_batch":
        kw["batch_size"] = len(data[0])
    if case == "mask":
        mask = torch.zeros_like(model[0].weight, dtype=torch.bool)
        mask[:, 1:] = True
        kw["params"] = {"0.weight": mask, "1.weight": torch.ones_like(model[1].weight)}
    if case == "per_chain_backward":
        monkeypatch.setattr(sampling, "PER_CHAIN_BACKWARD_MIN_BYTES", 0)
    target = prepare_target(model, data, loss_fn, compile=False, **kw)
    run = dict(num_chains=3, num_steps=9, step_size=1e-3, localization=2.0, nbeta=50.0, seed=5,
               acceptance_steps=[0, 4, 8], compile=False)
    ref, ref_final = _steps(target, **run)
    got, got_final = _steps(target, reuse_buffers=True, **run)
    _, state, _ = next(run_chains(target, reuse_buffers=True, **run))
    assert state.params.data_ptr() == target._work.data_ptr()  # the in-place path was taken
    assert torch.equal(got_final, ref_final) and not torch.equal(got_final, target.anchor[None])
    for a, b in zip(got, ref, strict=True):
        for x, y in zip(a, b, strict=True):
            assert (x is None and y is None) or torch.equal(x, y)
    assert sum(a[3] is not None for a in got) == 3
    # the activations of one chain's forward pass were measured (they decide per-chain backward)
    assert 0 < target._saved_bytes < sampling.PER_CHAIN_BACKWARD_MIN_BYTES or case == (
        "per_chain_backward")
