"""Metropolis-adjusted Langevin acceptance of an SGLD move, as a health check.

For a move ``w → w'`` proposed by a Langevin step with step size ε (and diagonal preconditioner G),
the MALA acceptance probability under the potential ``U`` is

    α = min(1, exp(U(w) − U(w') + log q(w | w') − log q(w' | w))),
    log q(b | a) = −‖b − a + ε/2·G·∇U(a)‖²_{G⁻¹} / (2ε).

Here U is the minibatch potential ``nβ·L_batch + γ/2‖w − w*‖²`` with the *same* batch at both
points. Values near 0.9 indicate a healthy step size; near 0 too large, near 1 possibly too small
(Lau et al. 2023, appendix; devinterp's MALA estimator).
"""

from __future__ import annotations

import torch
from torch import Tensor


def potential(params: Tensor, anchor: Tensor, loss: Tensor, *, localization: float, nbeta: float,
              mask: Tensor | None = None) -> Tensor:
    """``nβ·loss + γ/2·‖w − w*‖²`` over the sampled coordinates, per chain."""
    diff = params - anchor
    if mask is not None:
        diff = diff * mask
    return nbeta * loss + localization / 2 * diff.pow(2).sum(-1)


def acceptance_probability(params: Tensor, new_params: Tensor, potential_old: Tensor,
                           potential_new: Tensor, drift_old: Tensor, drift_new: Tensor, *,
                           step_size: float, precond: Tensor | None = None,
                           mask: Tensor | None = None) -> Tensor:
    """MALA acceptance probability of ``params → new_params``, per chain (the last dim is D).

    Args:
        params, new_params: the states before and after the move.
        potential_old, potential_new: U at both, on the same minibatch.
        drift_old, drift_new: ∇U at both, on the same minibatch.
        step_size: ε.
        precond: the diagonal preconditioner G (pSGLD), or None for SGLD.
        mask: sampled coordinates (others are excluded), or None.
    """
    g = torch.ones_like(params) if precond is None else precond
    fwd = new_params - params + step_size / 2 * g * drift_old
    bwd = params - new_params + step_size / 2 * g * drift_new
    if mask is not None:
        fwd, bwd = fwd * mask, bwd * mask
    log_q_fwd = -(fwd.pow(2) / g).sum(-1) / (2 * step_size)
    log_q_bwd = -(bwd.pow(2) / g).sum(-1) / (2 * step_size)
    log_ratio = potential_old - potential_new + log_q_bwd - log_q_fwd
    return torch.exp(torch.clamp(log_ratio, max=0.0).nan_to_num(nan=-torch.inf))
