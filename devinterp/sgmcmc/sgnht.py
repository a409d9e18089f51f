"""Stochastic gradient Nosé-Hoover thermostat (Ding et al. 2014, "Bayesian Sampling Using
Stochastic Gradient Thermostats"), in velocity form.

With velocity ``v`` (momentum × step), friction/thermostat ``ξ`` (one per chain), diffusion ``A``
and drift ``d = nβ∇L + γ(w − w*)``, one step with step size ε is

    v ← (1 − ξ)·v − ε/2·d + √(A·ε)·N(0, 1)
    w ← w + v
    ξ ← ξ + (‖v‖²/D − ε/2)

so the thermostat raises the friction while the kinetic energy per coordinate exceeds its
equilibrium value ε/2 and lowers it otherwise, absorbing unknown minibatch gradient noise.
``A`` and ``ξ`` play the role of ``h·A`` and ``h·ξ`` of the paper (h the time step) and must stay
small (default A = 0.01, ξ starts at A, as in devinterp's SGNHT): at ξ ≈ 1 the discretization
overshoots. Mask on drift, noise and the kinetic energy (D counts the sampled coordinates only).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from devinterp.sgmcmc import sgld
from devinterp.sgmcmc._common import Generators, masked_count, standard_normal


class SGNHTState(NamedTuple):
    """State of SGNHT chains: SGLD's fields plus ``velocity`` and ``thermostat`` (shape ``(...)``)."""

    params: Tensor
    anchor: Tensor
    mask: Tensor | None
    velocity: Tensor
    thermostat: Tensor


class SGNHTInfo(NamedTuple):
    """The (masked) drift, the standard normal draw and the kinetic energy per coordinate."""

    drift: Tensor
    noise: Tensor
    kinetic: Tensor


def init(params: Tensor, anchor: Tensor | None = None, mask: Tensor | None = None, *,
         diffusion: float = 0.01) -> SGNHTState:
    """Start chains at rest with the thermostat at the diffusion constant ``A``."""
    base = sgld.init(params, anchor, mask)
    thermostat = torch.full(base.params.shape[:-1], float(diffusion), dtype=base.params.dtype,
                            device=base.params.device)
    return SGNHTState(base.params, base.anchor, base.mask, torch.zeros_like(base.params),
                      thermostat)


def step(generator: Generators, state: SGNHTState, grads: Tensor, *, step_size: float,
         localization: float, nbeta: float, diffusion: float = 0.01, noise: Tensor | None = None
         ) -> tuple[SGNHTState, SGNHTInfo]:
    """One SGNHT step.

    Args:
        generator: one generator, or one per chain.
        state: current state.
        grads: gradient of the mean minibatch loss at ``state.params``.
        step_size: ε.
        localization: γ.
        nbeta: nβ.
        diffusion: A, the injected noise level.
        noise: pre-drawn standard normal noise, or None to draw from ``generator``.
    """
    d = sgld.drift(sgld.SGLDState(state.params, state.anchor, state.mask), grads,
                   localization=localization, nbeta=nbeta)
    if noise is None:
        noise = standard_normal(generator, state.params)
    scaled = noise * math.sqrt(diffusion * step_size)
    if state.mask is not None:
        scaled.mul_(state.mask)
    friction = (1 - state.thermostat).unsqueeze(-1)
    velocity = (state.velocity * friction).add_(d, alpha=-step_size / 2).add_(scaled)
    params = state.params + velocity
    kinetic = velocity.pow(2).sum(-1) / masked_count(state.mask, params)
    thermostat = state.thermostat + (kinetic - step_size / 2)
    return (SGNHTState(params, state.anchor, state.mask, velocity, thermostat),
            SGNHTInfo(d, noise, kinetic))
