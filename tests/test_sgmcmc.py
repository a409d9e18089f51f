import math

import pytest
import torch

from devinterp.sgmcmc import mala, rmsprop_sgld, sgld, sgnht


def _gens(c, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(c)]


def _run_quadratic(module, steps, eps, nbeta, gamma, chains=8, **kw):
    """Potential nbeta*|w|^2/2 + gamma/2 |w|^2: stationary variance 1/(nbeta+gamma)."""
    w0 = torch.zeros(chains, 50)
    state = module.init(w0, torch.zeros(50), None, **({"diffusion": kw["diffusion"]}
                                                      if "diffusion" in kw else {}))
    gens = _gens(chains)
    samples = []
    for t in range(steps):
        state, _ = module.step(gens, state, state.params.clone(), step_size=eps,
                               localization=gamma, nbeta=nbeta, **kw)
        if t > steps // 2:
            samples.append(state.params)
    return torch.stack(samples).var().item()


@pytest.mark.parametrize("module,kw", [(sgld, {}), (sgnht, {"diffusion": 0.01})])
def test_stationary_variance_of_gaussian(module, kw):
    nbeta, gamma, eps = 9.0, 1.0, 1e-3
    var = _run_quadratic(module, 4000, eps, nbeta, gamma, **kw)
    assert var == pytest.approx(1 / (nbeta + gamma), rel=0.15)


def test_sgld_zero_step_size_leaves_params_fixed():
    w = torch.randn(3, 10)
    state = sgld.init(w, w[0])
    new, info = sgld.step(_gens(3), state, torch.randn(3, 10), step_size=0.0,
                          localization=1.0, nbeta=100.0)
    assert torch.equal(new.params, w)
    assert info.drift.shape == w.shape


def test_mask_freezes_unselected_coordinates_for_every_sampler():
    w = torch.randn(2, 6)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    for module in (sgld, rmsprop_sgld, sgnht):
        state = module.init(w, w, mask)
        for _ in range(5):
            state, _ = module.step(_gens(2), state, torch.randn(2, 6), step_size=1e-2,
                                   localization=1.0, nbeta=10.0)
        moved = (state.params != w).any(0)
        assert moved.tolist() == [True, False, True, False, False, True], module.__name__


def test_same_generator_seed_same_step_and_chains_differ():
    w = torch.zeros(2, 5)
    a, _ = sgld.step(_gens(2), sgld.init(w), torch.zeros(2, 5), step_size=1.0,
                     localization=0.0, nbeta=1.0)
    b, _ = sgld.step(_gens(2), sgld.init(w), torch.zeros(2, 5), step_size=1.0,
                     localization=0.0, nbeta=1.0)
    assert torch.equal(a.params, b.params)
    assert not torch.equal(a.params[0], a.params[1])


def test_wrong_number_of_generators_is_explained():
    with pytest.raises(ValueError, match="one generator per chain"):
        sgld.step(_gens(3), sgld.init(torch.zeros(2, 4)), torch.zeros(2, 4), step_size=1.0,
                  localization=0.0, nbeta=1.0)


def test_sgnht_thermostat_reacts_to_kinetic_energy():
    state = sgnht.init(torch.zeros(1, 100), diffusion=0.01)
    # a huge gradient pumps kinetic energy above eps/2: the thermostat (friction) must rise
    state, info = sgnht.step(_gens(1), state, torch.full((1, 100), 50.0), step_size=1e-2,
                             localization=0.0, nbeta=1.0)
    assert info.kinetic.item() > 1e-2 / 2
    assert state.thermostat.item() > 0.01
    assert state.velocity.abs().sum() > 0


def test_rmsprop_preconditioner_bounded_by_inverse_eps():
    state = rmsprop_sgld.init(torch.zeros(1, 4))
    _, info = rmsprop_sgld.step(_gens(1), state, torch.tensor([[0.0, 1e-3, 1.0, 1e3]]),
                                step_size=1e-3, localization=0.0, nbeta=1.0, eps=0.1)
    assert (info.precond <= 10.0 + 1e-6).all()
    assert info.precond[0, 3] < info.precond[0, 0]


def test_mala_acceptance_high_for_small_step_low_for_huge_step():
    def acceptance(eps):
        gens = _gens(4)
        state = sgld.init(torch.randn(4, 20, generator=gens[0]) * 0.3, torch.zeros(20))
        nbeta = 100.0
        u = lambda w: nbeta * 0.5 * w.pow(2).sum(-1) / 20 * 0 + 0  # noqa: E731
        new, info = sgld.step(gens, state, state.params.clone(), step_size=eps,
                              localization=0.0, nbeta=nbeta)
        u_old = nbeta * 0.5 * state.params.pow(2).sum(-1) + u(state.params)
        u_new = nbeta * 0.5 * new.params.pow(2).sum(-1)
        return mala.acceptance_probability(state.params, new.params, u_old, u_new, info.drift,
                                           nbeta * new.params, step_size=eps).mean().item()

    assert acceptance(1e-4) > 0.95
    assert acceptance(5e-2) < 0.2
    assert math.isfinite(acceptance(1.0))
