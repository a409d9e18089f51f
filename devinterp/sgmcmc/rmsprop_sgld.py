"""RMSProp-preconditioned SGLD (pSGLD, Li, Chen, Carlson & Carin 2016, arXiv 1512.07666).

With ``V ← α·V + (1 − α)·d²`` the running mean of the squared drift ``d = nβ∇L + γ(w − w*)`` and
``G = 1/(λ + √V)`` the diagonal preconditioner, one step is

    Δw = −ε/2 · G·d + N(0, ε·G)

(the small Γ correction term of the paper is dropped, as is usual). Mask on drift and noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from devinterp.sgmcmc import sgld
from devinterp.sgmcmc._common import Generators, standard_normal


class RMSPropSGLDState(NamedTuple):
    """State of pSGLD chains: SGLD's fields plus ``square_avg`` (V) and the step count."""

    params: Tensor
    anchor: Tensor
    mask: Tensor | None
    square_avg: Tensor
    count: int


class RMSPropSGLDInfo(NamedTuple):
    """The (masked) drift, the standard normal draw and the preconditioner G used."""

    drift: Tensor
    noise: Tensor
    precond: Tensor


def init(params: Tensor, anchor: Tensor | None = None, mask: Tensor | None = None
         ) -> RMSPropSGLDState:
    """Start chains at ``params`` with an empty second-moment estimate."""
    base = sgld.init(params, anchor, mask)
    return RMSPropSGLDState(base.params, base.anchor, base.mask, torch.zeros_like(base.params), 0)


def step(generator: Generators, state: RMSPropSGLDState, grads: Tensor, *, step_size: float,
         localization: float, nbeta: float, alpha: float = 0.99, eps: float = 1e-1,
         noise: Tensor | None = None) -> tuple[RMSPropSGLDState, RMSPropSGLDInfo]:
    """One pSGLD step.

    Args:
        generator: one generator, or one per chain.
        state: current state.
        grads: gradient of the mean minibatch loss at ``state.params``.
        step_size: ε.
        localization: γ.
        nbeta: nβ.
        alpha: decay of the squared-drift average.
        eps: λ, added to √V; bounds the preconditioner by 1/λ.
        noise: pre-drawn standard normal noise, or None to draw from ``generator``.
    """
    d = sgld.drift(sgld.SGLDState(state.params, state.anchor, state.mask), grads,
                   localization=localization, nbeta=nbeta)
    count = state.count + 1
    square_avg = state.square_avg.mul(alpha).addcmul_(d, d, value=1 - alpha)
    # bias-corrected, so that the first steps are not preconditioned by a near-zero V
    v_hat = square_avg / (1 - alpha**count)
    precond = v_hat.sqrt_().add_(eps).reciprocal_()
    if noise is None:
        noise = standard_normal(generator, state.params)
    scaled = noise * precond.sqrt() * math.sqrt(step_size)
    if state.mask is not None:
        scaled.mul_(state.mask)
    new = state.params.addcmul(precond, d, value=-step_size / 2).add_(scaled)
    new_state = RMSPropSGLDState(new, state.anchor, state.mask, square_avg, count)
    return new_state, RMSPropSGLDInfo(d, noise, precond)
