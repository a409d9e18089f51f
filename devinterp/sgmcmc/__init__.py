"""Stochastic-gradient MCMC kernels: pure ``init``/``step`` functions on flat tensors.

Each sampler module exposes a state ``NamedTuple``, ``init(params, anchor, mask, ...)`` and
``step(generator, state, grads, ...) -> (state, info)``. Parameters are flat tensors of shape
``(chains, D)`` (or ``(D,)``); :mod:`devinterp.analyses.sampling` maps them to a model's weights.

- :mod:`devinterp.sgmcmc.sgld`: SGLD on the localized tempered posterior.
- :mod:`devinterp.sgmcmc.rmsprop_sgld`: RMSProp-preconditioned SGLD.
- :mod:`devinterp.sgmcmc.sgnht`: stochastic gradient Nosé-Hoover thermostat.
- :mod:`devinterp.sgmcmc.mala`: MALA acceptance of a Langevin move (a diagnostic).
"""

from devinterp.sgmcmc import mala, rmsprop_sgld, sgld, sgnht
from devinterp.sgmcmc._common import standard_normal

SAMPLERS = {"sgld": sgld, "rmsprop_sgld": rmsprop_sgld, "sgnht": sgnht}

__all__ = ["SAMPLERS", "mala", "rmsprop_sgld", "sgld", "sgnht", "standard_normal"]
