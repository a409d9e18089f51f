"""Stochastic gradient Langevin dynamics on the localized tempered posterior.

Welling & Teh 2011; localized form of Lau et al. 2023 (arXiv 2308.12108). Target:
``p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)``; one step with step size ε is

    Δw = −ε/2 · (nβ·∇L_batch(w) + γ·(w − w*)) + N(0, ε),

with drift and noise multiplied by the mask when one is given (coordinates outside the mask stay
fixed: the weight-refined LLC). The kernel works on flat tensors of shape ``(..., D)``; it never
sees a model, and ``grads`` (the gradient of the mean minibatch loss) come from elsewhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from devinterp.sgmcmc._common import Generators, standard_normal


class SGLDState(NamedTuple):
    """State of SGLD chains.

    Attributes:
        params: current coordinates, shape ``(..., D)`` (``(chains, D)`` for several chains).
        anchor: the centre of localization w*, broadcastable to ``params``.
        mask: 0/1 float tensor broadcastable to ``params`` selecting sampled coordinates, or None.
    """

    params: Tensor
    anchor: Tensor
    mask: Tensor | None = None


class SGLDInfo(NamedTuple):
    """What one step did: the drift ``nβ∇L + γ(w − w*)`` (masked) and the standard normal draw."""

    drift: Tensor
    noise: Tensor


def init(params: Tensor, anchor: Tensor | None = None, mask: Tensor | None = None) -> SGLDState:
    """Start chains at ``params`` localized at ``anchor`` (defaults to ``params`` itself)."""
    params = params.detach().clone()
    anchor = params.clone() if anchor is None else anchor.detach()
    return SGLDState(params, anchor, None if mask is None else mask.to(params.dtype))


def drift(state: SGLDState, grads: Tensor, *, localization: float, nbeta: float) -> Tensor:
    """The gradient of the potential ``U = nβ·L + γ/2‖w − w*‖²`` (masked)."""
    d = (state.params - state.anchor).mul_(localization).add_(grads, alpha=nbeta)
    if state.mask is not None:
        d.mul_(state.mask)
    return d


def step(generator: Generators, state: SGLDState, grads: Tensor, *, step_size: float,
         localization: float, nbeta: float, noise: Tensor | None = None
         ) -> tuple[SGLDState, SGLDInfo]:
    """One SGLD step.

    Args:
        generator: one generator, or one per chain (rows of ``params``).
        state: current state.
        grads: gradient of the mean minibatch loss at ``state.params``, same shape.
        step_size: ε.
        localization: γ.
        nbeta: nβ, the inverse temperature times the number of samples.
        noise: pre-drawn standard normal noise shaped like ``params``; drawn from ``generator``
            when None.

    Returns:
        The new state and an :class:`SGLDInfo`.
    """
    d = drift(state, grads, localization=localization, nbeta=nbeta)
    if noise is None:
        noise = standard_normal(generator, state.params)
    scaled = noise * math.sqrt(step_size)
    if state.mask is not None:
        scaled.mul_(state.mask)
    new = state.params.add(d, alpha=-step_size / 2).add_(scaled)
    return state._replace(params=new), SGLDInfo(d, noise)
