"""Pieces shared by the samplers: standard normal draws from per-chain generators, masking."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator]


def standard_normal(generator: Generators, like: Tensor) -> Tensor:
    """Draw N(0, 1) noise shaped like ``like``.

    Args:
        generator: one generator (``like`` is one chain) or one generator per chain (``like`` has
            shape ``(chains, ...)`` and row ``c`` is drawn from ``generator[c]``).
        like: tensor giving shape, dtype and device.
    """
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    generators = list(generator)
    if like.dim() == 0 or like.shape[0] != len(generators):
        raise ValueError(
            f"got {len(generators)} generators for a state of shape {tuple(like.shape)}: "
            "pass one generator per chain (first dimension)"
        )
    out = torch.empty_like(like)
    for row, gen in zip(out, generators, strict=True):
        torch.randn(row.shape, generator=gen, dtype=like.dtype, device=like.device, out=row)
    return out


def masked_count(mask: Tensor | None, params: Tensor) -> Tensor:
    """Number of sampled coordinates per chain (the last dimension), as a float tensor."""
    if mask is None:
        return torch.full(params.shape[:-1], float(params.shape[-1]), device=params.device)
    return mask.sum(-1).to(params.dtype).expand(params.shape[:-1])
