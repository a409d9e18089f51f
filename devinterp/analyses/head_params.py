"""Select the weights of one attention head, for the weight-refined LLC of that head.

The result is a dict ``{parameter name: bool mask}`` (``True`` = belongs to the head), the form
``estimate_llc(..., params=...)`` accepts: sampling then moves only those entries.

- Models that define ``head_param_masks(layer, head)`` (e.g.
  :class:`devinterp.models.AttentionOnlyTransformer`) are asked directly.
- TransformerLens ``TransformerBridge``, HF GPT-2 (fused ``c_attn`` Conv1D: the head's columns of
  each of the q, k, v blocks), GPT-NeoX / Pythia (fused, head-interleaved ``query_key_value``: the
  head's contiguous ``3 * d_head`` rows), Llama / Mistral (separate projections; grouped-query
  attention selects the shared key/value head): located by
  :mod:`devinterp.analyses.head_access`, which also serves the composition / QK / OV analyses.
- Models built from :class:`torch.nn.MultiheadAttention`: layer ``l`` is the ``l``-th such module in
  registration order (the order ``nn.TransformerEncoder`` also runs them); the head's rows of the
  q/k/v input projection (and biases) and its columns of ``out_proj.weight`` are selected.
- Anything else (e.g. SDPA with separate ``nn.Linear`` projections): name the projections with
  :func:`head_params_from_projections`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from devinterp.errors import InvalidInputError

__all__ = ["head_params", "head_params_from_projections"]


def _rows(p: Tensor, start: int, stop: int) -> Tensor:
    mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    mask[start:stop] = True
    return mask


def _cols(p: Tensor, start: int, stop: int) -> Tensor:
    mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    mask[..., start:stop] = True
    return mask


def _mha_masks(prefix: str, module: nn.MultiheadAttention, head: int) -> dict[str, Tensor]:
    E, H = module.embed_dim, module.num_heads
    dh = E // H
    lo, hi = head * dh, (head + 1) * dh
    p = f"{prefix}." if prefix else ""
    masks: dict[str, Tensor] = {}
    if module._qkv_same_embed_dim:
        mask = torch.zeros(module.in_proj_weight.shape, dtype=torch.bool, device=module.in_proj_weight.device)
        for block in range(3):
            mask[block * E + lo: block * E + hi] = True
        masks[p + "in_proj_weight"] = mask
    else:
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            masks[p + name] = _rows(getattr(module, name), lo, hi)
    if module.in_proj_bias is not None:
        mask = torch.zeros(module.in_proj_bias.shape, dtype=torch.bool, device=module.in_proj_bias.device)
        for block in range(3):
            mask[block * E + lo: block * E + hi] = True
        masks[p + "in_proj_bias"] = mask
    if module.bias_k is not None:
        masks[p + "bias_k"] = _cols(module.bias_k, lo, hi)
        masks[p + "bias_v"] = _cols(module.bias_v, lo, hi)
    masks[p + "out_proj.weight"] = _cols(module.out_proj.weight, lo, hi)
    return masks


def head_params(model: nn.Module, layer: int, head: int) -> dict[str, Tensor]:
    """Boolean masks ``{name: mask}`` selecting the weights of head ``head`` of layer ``layer``.

    The heads are located by :func:`devinterp.analyses.head_access.head_param_masks` (the one
    per-head weight access shared with the composition / QK / OV analyses): a model's own
    ``head_param_masks`` method, TransformerLens' ``TransformerBridge``, HF GPT-2, GPT-NeoX/Pythia,
    Llama/Mistral (grouped-query attention: the query head's rows plus the rows of the key/value
    head it reads, ``head // (heads // kv_heads)``, shared with its group), or
    :class:`torch.nn.MultiheadAttention`. Shared parameters (output biases, embeddings,
    LayerNorms) are not included.

    Raises:
        InvalidInputError: No such head, or the model's attention weights cannot be located
            automatically (then use :func:`head_params_from_projections`).
    """
    from devinterp.analyses.head_access import head_param_masks

    try:
        return head_param_masks(model, layer, head)
    except InvalidInputError as err:
        if "cannot locate" not in str(err):
            raise
        raise InvalidInputError(
            f"cannot locate the attention weights of {type(model).__name__}: not a supported family "
            "(ours, TransformerBridge, HF GPT-2/GPT-NeoX/Llama, nn.MultiheadAttention) and no "
            "head_param_masks(layer, head) method. Name the q/k/v/out projections with "
            "head_params_from_projections(model, q=..., k=..., v=..., o=..., ...)"
        ) from None


def head_params_from_projections(
    model: nn.Module,
    *,
    q: str,
    k: str,
    v: str,
    o: str,
    head: int,
    num_heads: int,
    num_kv_heads: int | None = None,
) -> dict[str, Tensor]:
    """Masks for one head of an attention built from ``nn.Linear`` projections.

    The head's output rows of the ``q`` projection, the rows of its key/value head in ``k`` and ``v``
    (with grouped-query attention, key/value head ``head // (num_heads // num_kv_heads)``, which is
    shared with the other query heads of its group), and its input columns of ``o`` are selected,
    biases included. Heads are assumed contiguous (``view(..., heads, d_head)`` convention).

    Args:
        model: The model.
        q, k, v, o: Names (as in ``model.named_modules()``) of the query, key, value and output
            ``nn.Linear`` projections.
        head: Query head index.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads (default ``num_heads``).
    """
    modules = dict(model.named_modules())
    linears = {}
    for role, name in (("q", q), ("k", k), ("v", v), ("o", o)):
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise InvalidInputError(f"{role}={name!r} is not an nn.Linear of the model")
        linears[role] = (name, m)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise InvalidInputError(
            f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
    if not 0 <= head < num_heads:
        raise InvalidInputError(f"head must be in [0, {num_heads}), got {head}")
    kv_head = head // (num_heads // num_kv_heads)
    masks: dict[str, Tensor] = {}
    for role, index, count in (("q", head, num_heads), ("k", kv_head, num_kv_heads),
                               ("v", kv_head, num_kv_heads)):
        name, lin = linears[role]
        if lin.out_features % count:
            raise InvalidInputError(f"{name} has {lin.out_features} outputs, not divisible by {count} heads")
        dh = lin.out_features // count
        masks[f"{name}.weight"] = _rows(lin.weight, index * dh, (index + 1) * dh)
        if lin.bias is not None:
            masks[f"{name}.bias"] = _rows(lin.bias, index * dh, (index + 1) * dh)
    name, lin = linears["o"]
    if lin.in_features % num_heads:
        raise InvalidInputError(f"{name} has {lin.in_features} inputs, not divisible by {num_heads} heads")
    dh = lin.in_features // num_heads
    masks[f"{name}.weight"] = _cols(lin.weight, head * dh, (head + 1) * dh)
    return masks
