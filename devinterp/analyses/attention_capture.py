"""See the attention patterns of any PyTorch model, and ablate heads, without changing its code.

Two kinds of attention are intercepted while :func:`capture_attention` is active:

1. **Calls of** :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA), however the model
   reaches it (``F.scaled_dot_product_attention``, ``from torch.nn.functional import
   scaled_dot_product_attention``, ``torch._C._nn...``): a :class:`torch.overrides.TorchFunctionMode`
   sees every call. The pattern ``softmax(Q Kᵀ · scale + mask)`` is recomputed explicitly; without
   gradients and dropout, the call's output is then ``pattern @ V`` (what SDPA's reference "math"
   backend computes, equal up to float rounding) so that the attention is not computed twice;
   otherwise the original SDPA computes the output. The recomputation honours
   ``is_causal`` (top-left aligned, as SDPA), boolean (``True`` = may attend) and additive float
   ``attn_mask``, a custom ``scale`` and grouped-query attention (``enable_gqa``: key/value heads
   shared by groups of query heads). Dropout is not applied to the recorded pattern. Query shapes
   ``(..., heads, L, E)`` give one layer with ``heads`` heads (leading dims flattened into the batch);
   3-d ``(batch, L, E)`` and 2-d ``(L, E)`` queries count as a single head.
2. **Modules** :class:`torch.nn.MultiheadAttention`, including those inside
   :class:`torch.nn.TransformerEncoderLayer` / ``TransformerDecoderLayer``: their ``forward`` is
   replaced, for the duration, by a re-implementation that computes the per-head weights explicitly
   (``need_weights=False`` and the fused fast path included; the fast path is switched off with
   ``torch.backends.mha.set_fastpath_enabled(False)`` meanwhile). It supports ``batch_first``,
   unbatched inputs, separate q/k/v projections (``kdim``/``vdim``), ``bias_k``/``bias_v``,
   ``add_zero_attn``, ``key_padding_mask`` and ``attn_mask`` (bool: ``True`` = masked out, or float),
   ``is_causal`` and dropout (in training mode).

Layers are numbered in the order their attention runs within one forward pass of the model (the
count restarts at every call of the model). The SDPA interception sees every SDPA call made in the
process while the context is active (not only those of ``model``): run nothing else meanwhile. Ablating head ``h`` of layer ``l`` zeroes that head's
output before the output projection (for SDPA: the slice ``h`` of its output along the head axis).
Everything is restored on exit, also after an exception.

Any other attention (TransformerLens, HuggingFace eager attention, attention written by hand) is
read through an adapter (:mod:`devinterp.analyses.attention_adapters`), chosen from the model's type
or passed as ``attention=``; :attr:`AttentionCapture.source` says which was used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from devinterp.errors import AttentionNotFoundError, InvalidInputError

__all__ = [
    "AttentionCapture",
    "LayerInfo",
    "capture_attention",
    "sdpa_pattern",
    "SUPPORTED",
    "attention_not_found",
]

_SDPA = torch._C._nn.scaled_dot_product_attention

SUPPORTED = (
    "calls of torch.nn.functional.scaled_dot_product_attention (any import alias) and "
    "torch.nn.MultiheadAttention modules (also inside nn.TransformerEncoderLayer / "
    "TransformerDecoderLayer)"
)


def attention_not_found(model: nn.Module, source: str = "sdpa") -> AttentionNotFoundError:
    """The error raised when a forward pass of ``model`` ran no attention we can see."""
    from devinterp.analyses.attention_adapters import ADAPTER_EXAMPLE

    if source not in ("sdpa", "multihead_attention"):
        return AttentionNotFoundError(
            f"the {source!r} attention adapter saw no attention pattern while running "
            f"{type(model).__name__}: check that its pattern modules run in the model's forward"
        )
    return AttentionNotFoundError(
        f"no attention was seen while running {type(model).__name__}: recognised by themselves are "
        f"{SUPPORTED}, TransformerLens models and HuggingFace models (sdpa or eager attention). "
        "For attention written by hand (softmax(q @ k.T)), name the module whose output is the "
        "pattern and the output projection:\n" + ADAPTER_EXAMPLE
        + "\n(see devinterp.analyses.attention_adapters; if no module sees the pattern, add "
        "self.hook_pattern = nn.Identity() and att = self.hook_pattern(att))"
    )


@dataclass(frozen=True)
class LayerInfo:
    """One intercepted attention computation: its layer index, kind and number of heads."""

    layer: int
    kind: str  # "sdpa" or "multihead_attention"
    num_heads: int
    module_name: str | None = None  # the nn.MultiheadAttention's name in the model, if any


class AttentionCapture:
    """What :func:`capture_attention` sees during the latest forward pass of the model.

    Attributes:
        patterns: Per layer, in call order, the attention pattern ``(batch, heads, L, S)`` (float32,
            detached); empty when ``record`` is False.
        layers: Per layer, a :class:`LayerInfo`.
        ablate: Set of ``(layer, head)`` whose output is zeroed; may be changed between calls.
        record: Whether patterns are recorded (turning it off makes ablation runs cheaper).
        adapter: The adapter reading the attention (None: SDPA / MultiheadAttention capture).
    """

    def __init__(self, ablate: Iterable[tuple[int, int]] = (), record: bool = True, adapter=None):
        self.ablate: set[tuple[int, int]] = {(int(a), int(b)) for a, b in ablate}
        self.record = record
        self.adapter = adapter
        self.patterns: list[Tensor] = []
        self.layers: list[LayerInfo] = []
        self._in_mha = 0

    @property
    def source(self) -> str:
        """Which capture saw the attention: the adapter's name (``"transformer_lens"``,
        ``"hf-eager"``, ``"modules"``...), else the kinds seen (``"sdpa"``,
        ``"multihead_attention"``, or both joined by ``+``)."""
        if self.adapter is not None:
            return self.adapter.name
        kinds = sorted({info.kind for info in self.layers})
        return "+".join(kinds) if kinds else "sdpa"

    def _reset(self) -> None:
        self.patterns = []
        self.layers = []

    def _add_layer(self, layer: int, kind: str, num_heads: int, module_name: str | None,
                   pattern: Tensor | None) -> None:
        """Record a layer with a fixed index (adapters number layers by module order)."""
        self.layers.append(LayerInfo(layer, kind, num_heads, module_name))
        if pattern is not None:
            self.patterns.append(pattern)

    def _finish(self) -> None:
        """Put layers recorded by an adapter in layer order (they may run in another order)."""
        order = sorted(range(len(self.layers)), key=lambda i: self.layers[i].layer)
        if order != list(range(len(order))):
            self.layers = [self.layers[i] for i in order]
            if len(self.patterns) == len(order):
                self.patterns = [self.patterns[i] for i in order]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _next_layer(self, kind: str, num_heads: int, module_name: str | None = None) -> int:
        layer = len(self.layers)
        self.layers.append(LayerInfo(layer, kind, num_heads, module_name))
        return layer

    def _heads_to_ablate(self, layer: int, num_heads: int) -> list[int]:
        heads = [h for (lay, h) in self.ablate if lay == layer]
        bad = [h for h in heads if not 0 <= h < num_heads]
        if bad:
            raise InvalidInputError(f"cannot ablate heads {bad} of layer {layer}: it has {num_heads} heads")
        return heads


# ----------------------------------------------------------------------------------------------
# SDPA
# ----------------------------------------------------------------------------------------------
def sdpa_pattern(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """The attention pattern that ``F.scaled_dot_product_attention`` applies (without dropout).

    Returns ``softmax(Q Kᵀ · scale + bias)`` with the shape of ``Q Kᵀ`` (``(..., heads, L, S)``),
    in float32; rows that are entirely masked give zeros (not NaN).
    """
    q, k = query.float(), key.float()
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if is_causal:
        future = torch.ones(L, S, dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(future, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    pattern = torch.softmax(scores, dim=-1)
    # a causal mask alone never empties a row (row i keeps column 0); other masks may
    return pattern if attn_mask is None else pattern.nan_to_num_(0.0)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def _bind_sdpa(args: tuple, kwargs: dict) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_ARGS, args, strict=False))
    bound.update(kwargs)
    return bound


def _as_bhls(pattern: Tensor) -> Tensor:
    """Reshape a pattern to ``(batch, heads, L, S)`` (see the module docstring for the rules)."""
    if pattern.dim() >= 4:
        return pattern.reshape(-1, *pattern.shape[-3:])
    if pattern.dim() == 3:
        return pattern.unsqueeze(1)
    return pattern[None, None]


class _SDPAMode(TorchFunctionMode):
    def __init__(self, capture: AttentionCapture):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA or self.capture._in_mha:
            return func(*args, **kwargs)
        b = _bind_sdpa(args, kwargs)
        q, v = b["query"], b["value"]
        num_heads = q.size(-3) if q.dim() >= 4 else 1
        cap = self.capture
        layer = cap._next_layer("sdpa", num_heads)
        if cap.record:
            pattern = sdpa_pattern(q, b["key"], b["attn_mask"], b["is_causal"], b["scale"],
                                   b["enable_gqa"])
            cap.patterns.append(_as_bhls(pattern.detach()))
        if cap.record and not b["dropout_p"] and not q.requires_grad and pattern.shape[:-2] == q.shape[:-2]:
            # reuse the pattern for the output (the math backend of SDPA computes the same thing)
            if b["enable_gqa"] and v.dim() >= 3 and v.size(-3) != q.size(-3):
                v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
            out = torch.matmul(pattern.to(v.dtype), v)
        else:
            out = func(*args, **kwargs)  # the original computes the output
        heads = cap._heads_to_ablate(layer, num_heads)
        if heads:
            out = out.clone()
            if out.dim() >= 4:
                out[..., heads, :, :] = 0
            else:
                out.zero_()
        return out


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------
def _mha_mask(mask: Tensor | None, *, true_means_masked: bool) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf")) \
            if true_means_masked else mask
    return mask.float()


def _mha_forward(module: nn.MultiheadAttention, name: str, cap: AttentionCapture,
                 query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                 need_weights: bool = True, attn_mask: Tensor | None = None,
                 average_attn_weights: bool = True, is_causal: bool = False):
    """``nn.MultiheadAttention.forward`` with explicit per-head weights, recording and ablation."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif module.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    L, N, E = query.shape
    H = module.num_heads
    dh = E // H
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq = bk = bv = None
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.chunk(3)
    q = F.linear(query, wq, bq)
    k = F.linear(key, wk, bk)
    v = F.linear(value, wv, bv)

    bias = _mha_mask(attn_mask, true_means_masked=True)
    if bias is None and is_causal:
        S0 = k.shape[0]
        bias = torch.zeros(L, S0, device=q.device).masked_fill(
            ~torch.ones(L, S0, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    kpm = _mha_mask(key_padding_mask, true_means_masked=True)
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.expand(1, N, E)])
        v = torch.cat([v, module.bias_v.expand(1, N, E)])
        bias = None if bias is None else F.pad(bias, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    S = k.shape[0]
    q = q.reshape(L, N, H, dh).permute(1, 2, 0, 3)
    k = k.reshape(S, N, H, dh).permute(1, 2, 0, 3)
    v = v.reshape(S, N, H, dh).permute(1, 2, 0, 3)
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(N, H, 1, dh)], dim=2)
        v = torch.cat([v, v.new_zeros(N, H, 1, dh)], dim=2)
        bias = None if bias is None else F.pad(bias, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
    if bias is not None:
        scores = scores + (bias.reshape(N, H, L, -1) if bias.dim() == 3 else bias)
    if kpm is not None:
        scores = scores + kpm[:, None, None, :]
    pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0)

    layer = cap._next_layer("multihead_attention", H, name)
    if cap.record:
        cap.patterns.append(pattern.detach().float())
    p = F.dropout(pattern, module.dropout) if module.training and module.dropout > 0 else pattern
    z = p @ v  # (N, H, L, dh)
    heads = cap._heads_to_ablate(layer, H)
    if heads:
        keep = torch.ones(H, device=z.device, dtype=z.dtype)
        keep[heads] = 0
        z = z * keep[None, :, None, None]
    z = z.permute(2, 0, 1, 3).reshape(L, N, E)
    out = F.linear(z, module.out_proj.weight, module.out_proj.bias)
    if not batched:
        out = out.squeeze(1)
    elif module.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        weights = pattern.mean(dim=1) if average_attn_weights else pattern
        if not batched:
            weights = weights.squeeze(0)
    return out, weights


# ----------------------------------------------------------------------------------------------
# The context manager
# ----------------------------------------------------------------------------------------------
@contextmanager
def capture_attention(
    model: nn.Module,
    *,
    ablate: Iterable[tuple[int, int]] = (),
    record: bool = True,
    attention: Any = "auto",
) -> Iterator[AttentionCapture]:
    """Intercept the attention of ``model`` while the ``with`` block runs.

    Args:
        model: The model (its forward pass resets the layer count).
        ablate: ``(layer, head)`` pairs whose output is zeroed before the output projection.
        record: Record the attention patterns.
        attention: ``"auto"`` (default): choose from the model's type
            (:func:`~devinterp.analyses.attention_adapters.choose_adapter`: TransformerLens,
            HuggingFace eager, else SDPA / MultiheadAttention); ``"sdpa"``: the SDPA /
            MultiheadAttention capture; or an adapter such as
            :class:`~devinterp.analyses.attention_adapters.ModuleAttention`.

    Yields:
        An :class:`AttentionCapture` describing the latest forward pass.

    Example:
        >>> with capture_attention(model) as cap:
        ...     model(tokens)
        >>> cap.patterns[0].shape   # (batch, heads, T, T) of the first attention layer
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapter = _resolve_adapter(model, attention)
    if adapter is not None:
        with _capture_with_adapter(model, adapter, ablate, record) as cap:
            yield cap
        return
    cap = AttentionCapture(ablate, record)
    patched: list[tuple[nn.Module, object]] = []
    handles = []
    mode = _SDPAMode(cap)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    entered = False
    try:
        handles.append(model.register_forward_pre_hook(lambda mod, args: cap._reset()))
        for name, module in model.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                previous = module.__dict__.get("forward", _MISSING)
                patched.append((module, previous))
                module.forward = _bound_mha(module, name, cap)
        torch.backends.mha.set_fastpath_enabled(False)
        mode.__enter__()
        entered = True
        yield cap
    finally:
        if entered:
            mode.__exit__(None, None, None)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, previous in reversed(patched):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        for h in handles:
            h.remove()


_MISSING = object()


def _resolve_adapter(model: nn.Module, attention: Any):
    from devinterp.analyses.attention_adapters import choose_adapter

    if isinstance(attention, str):
        if attention == "auto":
            return choose_adapter(model)
        if attention == "sdpa":
            return None
        raise InvalidInputError(
            f"attention must be 'auto', 'sdpa' or an adapter (e.g. ModuleAttention), got {attention!r}"
        )
    if attention is None:
        return None
    if not callable(getattr(attention, "install", None)) or not hasattr(attention, "name"):
        raise InvalidInputError(
            f"attention must be 'auto', 'sdpa' or an adapter with install(model, capture) and a name "
            f"(e.g. ModuleAttention), got {type(attention).__name__}"
        )
    return attention


@contextmanager
def _capture_with_adapter(model: nn.Module, adapter: Any, ablate, record: bool) -> Iterator[AttentionCapture]:
    cap = AttentionCapture(ablate, record, adapter=adapter)
    undo = []
    try:
        undo.append(model.register_forward_pre_hook(lambda mod, args: cap._reset()).remove)
        undo.append(model.register_forward_hook(lambda mod, args, out: cap._finish()).remove)
        undo.extend(adapter.install(model, cap))
        yield cap
    finally:
        for fn in reversed(undo):
            fn()


def _bound_mha(module: nn.MultiheadAttention, name: str, cap: AttentionCapture):
    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        cap._in_mha += 1
        try:
            return _mha_forward(module, name, cap, query, key, value, key_padding_mask,
                                need_weights, attn_mask, average_attn_weights, is_causal)
        finally:
            cap._in_mha -= 1

    return forward
