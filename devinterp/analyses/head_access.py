"""One per-head view of a transformer's attention weights, for every supported model family.

Two things are located here and nowhere else:

- :func:`head_weights` — the weights of every head as plain tensors in the **row-vector
  convention** of Elhage et al. (2021) and TransformerLens (``x @ W``): ``W_Q, W_K, W_V``
  ``(layers, heads, d_model, d_head)``, ``W_O`` ``(layers, heads, d_head, d_model)``, their biases
  where the model has them, and ``W_E`` ``(vocab, d_model)``, ``W_U`` ``(d_model, vocab)``,
  ``W_pos`` ``(n_ctx, d_model)`` (``None`` for rotary or no positions). The composition, QK and OV
  analyses (:mod:`devinterp.analyses.composition`) read them.
- :func:`head_param_masks` — which entries of which named parameters belong to one head (the
  parameter-name / index mapping), for the weight-refined LLC
  (:func:`devinterp.analyses.head_params.head_params`).

Families (picked from the model's structure, first match wins):

=====================  ================================================================================
``"devinterp"``        :class:`devinterp.models.AttentionOnlyTransformer` (head-first ``W_Q`` ...)
``"transformer_lens"`` TransformerLens ``TransformerBridge``: its own ``W_Q ... W_U`` (no folding
                       unless the bridge folded them, as TransformerLens' own circuit code reads them)
``"gpt2"``             HF GPT-2 (``transformer.h[l].attn.c_attn``: fused Conv1D, ``[q | k | v]``)
``"gpt_neox"``         HF GPT-NeoX / Pythia (``query_key_value``: head-interleaved ``[h0 q k v, h1 q k v ...]``)
``"llama"``            HF Llama / Mistral / Qwen2 ... (separate ``q_proj k_proj v_proj o_proj``, GQA)
``"mha"``              models built from :class:`torch.nn.MultiheadAttention` (layer ``l`` = the
                       ``l``-th such module in registration order)
=====================  ================================================================================

**Grouped-query attention.** With ``n_kv`` key/value heads for ``n`` query heads, query head ``h``
reads key/value head ``h // (n // n_kv)``. :func:`head_weights` expands ``W_K, W_V`` (and biases) to
one per query head (as TransformerLens does), so every query head has its full QK and OV circuit;
:func:`head_param_masks` selects the shared key/value rows, so the weight-refined LLC of a query
head samples its key/value head too (which the other query heads of the group share).

**LayerNorm is not folded**: the weights are the model's own (TransformerLens' bridge also leaves
them unfolded by default). A pre-LayerNorm's scale rescales the residual stream each head reads, so
compare scores across models only with the same convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from devinterp.errors import InvalidInputError

__all__ = ["HeadWeights", "head_weights", "head_param_masks", "model_family", "find_supported"]


@dataclass(frozen=True)
class HeadWeights:
    """Every head's weights in the row-vector convention (``x @ W``), detached float32 copies.

    Attributes:
        W_Q, W_K, W_V: ``(layers, heads, d_model, d_head)`` (keys/values expanded to query heads).
        W_O: ``(layers, heads, d_head, d_model)``.
        b_Q, b_K, b_V: ``(layers, heads, d_head)`` or None. b_O: ``(layers, d_model)`` or None.
        W_E: ``(vocab, d_model)`` token embedding, or None if the model has none we can find.
        W_U: ``(d_model, vocab)`` unembedding, or None; with tied embeddings the transposed view of
            the ``W_E`` copy (one vocabulary-sized copy, and the tie is seen at no cost).
        W_pos: ``(n_ctx, d_model)`` learned absolute positions, or None (rotary, none, unknown).
        family: Which adapter read them (see the module docstring).
        kv_group: Query heads per key/value head (1 without grouped-query attention).
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    b_Q: Tensor | None
    b_K: Tensor | None
    b_V: Tensor | None
    b_O: Tensor | None
    W_E: Tensor | None
    W_U: Tensor | None
    W_pos: Tensor | None
    family: str
    kv_group: int = 1

    @property
    def n_layers(self) -> int:
        return int(self.W_Q.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.W_Q.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.W_Q.shape[2])

    @property
    def d_head(self) -> int:
        return int(self.W_Q.shape[3])

    def labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]`` in (layer, head) order."""
        return [f"L{layer}H{h}" for layer in range(self.n_layers) for h in range(self.n_heads)]


def _f(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float32).clone()


def _embed_unembed(W_E: Tensor | None, W_U: Tensor | None) -> dict[str, Tensor | None]:
    """``W_E``, ``W_U`` copies; with tied weights (``W_U`` a transposed view of ``W_E``'s storage,
    as HF's ``lm_head`` tied to ``wte``) ``W_U`` is the transposed view of the one ``W_E`` copy:
    the vocabulary-sized matrix is copied once and the tie stays visible (OV copying then takes
    the half-cost ``W_Eᵀ W_E``)."""
    E = _f(W_E)
    if (W_E is not None and W_U is not None and W_U.shape == W_E.T.shape
            and W_U.data_ptr() == W_E.data_ptr() and W_U.stride() == W_E.T.stride()):
        return {"W_E": E, "W_U": E.T}
    return {"W_E": E, "W_U": _f(W_U)}


def _stack(ts: list[Tensor | None]) -> Tensor | None:
    if any(t is None for t in ts):
        return None
    return torch.stack([_f(t) for t in ts])


def _expand(t: Tensor | None, group: int) -> Tensor | None:
    """``(kv_heads, ...)`` -> ``(kv_heads * group, ...)``: query head h reads kv head h // group."""
    return None if t is None or group == 1 else t.repeat_interleave(group, dim=0)


def _mask(p: Tensor, index) -> Tensor:
    m = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    m[index] = True
    return m


def _check_head(layer: int, head: int, n_layers: int, n_heads: int) -> None:
    if not (isinstance(layer, int) and isinstance(head, int) and 0 <= layer < n_layers and 0 <= head < n_heads):
        raise InvalidInputError(
            f"no head L{layer}H{head}: the model has {n_layers} layers x {n_heads} heads")


def _prefix(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise InvalidInputError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _lm_head(model: nn.Module) -> Tensor | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        return head.weight.T
    for attr in ("lm_head", "embed_out"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Linear):
            return m.weight.T
    return None


# ----------------------------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------------------------
class _Family(Protocol):
    """What every model family below provides (static methods on a class)."""

    name: str

    @staticmethod
    def match(model: nn.Module) -> bool: ...

    @staticmethod
    def weights(model: nn.Module) -> HeadWeights: ...

    @staticmethod
    def masks(model: nn.Module, layer: int, head: int) -> dict[str, Tensor]: ...


def _tensor(model: nn.Module, paths: tuple[str, ...]) -> Tensor | None:
    """The first of the dotted attribute ``paths`` that is a tensor (HookedTransformer-style names too)."""
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, Tensor):
            return obj
    return None


class _Ours(_Family):
    """Head-first ``blocks[l].attn.W_Q (heads, d_model, d_head)``: ours, and HookedTransformer-style."""

    name = "devinterp"

    @staticmethod
    def match(model):
        blocks = getattr(model, "blocks", None)
        return (isinstance(blocks, nn.ModuleList) and len(blocks) > 0
                and isinstance(getattr(getattr(blocks[0], "attn", None), "W_Q", None), nn.Parameter)
                and blocks[0].attn.W_Q.dim() == 3 and hasattr(model, "embed"))

    @staticmethod
    def weights(model):
        attns = [b.attn for b in model.blocks]
        W_U = getattr(model, "W_U", None)
        return HeadWeights(
            W_Q=_stack([a.W_Q for a in attns]), W_K=_stack([a.W_K for a in attns]),
            W_V=_stack([a.W_V for a in attns]), W_O=_stack([a.W_O for a in attns]),
            b_Q=_stack([a.b_Q for a in attns]), b_K=_stack([a.b_K for a in attns]),
            b_V=_stack([a.b_V for a in attns]), b_O=_stack([a.b_O for a in attns]),
            **_embed_unembed(_tensor(model, ("embed.weight", "embed.W_E")),
                             W_U if isinstance(W_U, Tensor) else _tensor(model, ("unembed.W_U",))),
            W_pos=_f(_tensor(model, ("pos_embed", "pos_embed.W_pos"))),
            family="devinterp",
        )

    @staticmethod
    def masks(model, layer, head):
        if hasattr(model, "head_param_masks"):
            return model.head_param_masks(layer, head)
        attn = model.blocks[layer].attn
        _check_head(layer, head, len(model.blocks), attn.W_Q.shape[0])
        p = _prefix(model, attn)
        return {p + n: _mask(t, head) for n, t in attn.named_parameters() if n != "b_O"}


class _GPT2(_Family):
    name = "gpt2"

    @staticmethod
    def _body(model):
        return getattr(model, "transformer", model)

    @staticmethod
    def match(model):
        h = getattr(_GPT2._body(model), "h", None)
        return (isinstance(h, nn.ModuleList) and len(h) > 0
                and hasattr(getattr(h[0], "attn", None), "c_attn") and hasattr(h[0].attn, "c_proj"))

    @staticmethod
    def _dims(model):
        body = _GPT2._body(model)
        H = int(model.config.n_head)
        d = int(body.h[0].attn.c_attn.weight.shape[0])
        return body, H, d, d // H

    @staticmethod
    def weights(model):
        body, H, d, dh = _GPT2._dims(model)
        per = {k: [] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
        for blk in body.h:
            W = blk.attn.c_attn.weight  # (d, 3d), x @ W
            b = blk.attn.c_attn.bias
            for i, k in enumerate(("Q", "K", "V")):
                per[f"W_{k}"].append(W[:, i * d:(i + 1) * d].reshape(d, H, dh).permute(1, 0, 2))
                per[f"b_{k}"].append(None if b is None else b[i * d:(i + 1) * d].reshape(H, dh))
            per["W_O"].append(blk.attn.c_proj.weight.reshape(H, dh, d))
            per["b_O"].append(blk.attn.c_proj.bias)
        wpe = getattr(body, "wpe", None)
        return HeadWeights(**{k: _stack(v) for k, v in per.items()}, **_embed_unembed(body.wte.weight, _lm_head(model)),
                           W_pos=None if wpe is None else _f(wpe.weight),
                           family="gpt2")

    @staticmethod
    def masks(model, layer, head):
        body, H, d, dh = _GPT2._dims(model)
        _check_head(layer, head, len(body.h), H)
        attn = body.h[layer].attn
        p = _prefix(model, attn)
        cols = torch.cat([torch.arange(i * d + head * dh, i * d + (head + 1) * dh) for i in range(3)])
        out = {p + "c_attn.weight": _mask(attn.c_attn.weight, (slice(None), cols))}
        if attn.c_attn.bias is not None:
            out[p + "c_attn.bias"] = _mask(attn.c_attn.bias, cols)
        out[p + "c_proj.weight"] = _mask(attn.c_proj.weight, slice(head * dh, (head + 1) * dh))
        return out


class _NeoX(_Family):
    name = "gpt_neox"

    @staticmethod
    def _body(model):
        return getattr(model, "gpt_neox", model)

    @staticmethod
    def match(model):
        layers = getattr(_NeoX._body(model), "layers", None)
        return (isinstance(layers, nn.ModuleList) and len(layers) > 0
                and hasattr(getattr(layers[0], "attention", None), "query_key_value"))

    @staticmethod
    def _dims(model):
        body = _NeoX._body(model)
        H = int(model.config.num_attention_heads)
        d = int(body.layers[0].attention.query_key_value.weight.shape[1])
        return body, H, d, d // H

    @staticmethod
    def weights(model):
        body, H, d, dh = _NeoX._dims(model)
        per = {k: [] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
        for blk in body.layers:
            qkv = blk.attention.query_key_value  # out index = h * 3dh + part * dh + j
            W = qkv.weight.reshape(H, 3, dh, d)
            b = None if qkv.bias is None else qkv.bias.reshape(H, 3, dh)
            for i, k in enumerate(("Q", "K", "V")):
                per[f"W_{k}"].append(W[:, i].transpose(1, 2))
                per[f"b_{k}"].append(None if b is None else b[:, i])
            dense = blk.attention.dense  # (d, d) Linear: y = z @ dense.weight.T
            per["W_O"].append(dense.weight.T.reshape(H, dh, d))
            per["b_O"].append(dense.bias)
        return HeadWeights(**{k: _stack(v) for k, v in per.items()}, **_embed_unembed(body.embed_in.weight, _lm_head(model)),
                           W_pos=None, family="gpt_neox")

    @staticmethod
    def masks(model, layer, head):
        body, H, d, dh = _NeoX._dims(model)
        _check_head(layer, head, len(body.layers), H)
        attn = body.layers[layer].attention
        p = _prefix(model, attn)
        rows = slice(head * 3 * dh, (head + 1) * 3 * dh)  # this head's q, k and v rows
        out = {p + "query_key_value.weight": _mask(attn.query_key_value.weight, rows)}
        if attn.query_key_value.bias is not None:
            out[p + "query_key_value.bias"] = _mask(attn.query_key_value.bias, rows)
        out[p + "dense.weight"] = _mask(attn.dense.weight, (slice(None), slice(head * dh, (head + 1) * dh)))
        return out


class _Llama(_Family):
    name = "llama"

    @staticmethod
    def _body(model):
        return getattr(model, "model", model)

    @staticmethod
    def match(model):
        layers = getattr(_Llama._body(model), "layers", None)
        if not (isinstance(layers, nn.ModuleList) and len(layers) > 0):
            return False
        attn = getattr(layers[0], "self_attn", None)
        return all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))

    @staticmethod
    def _dims(model):
        body = _Llama._body(model)
        cfg = model.config
        H = int(cfg.num_attention_heads)
        Hkv = int(getattr(cfg, "num_key_value_heads", None) or H)
        attn = body.layers[0].self_attn
        d = int(attn.q_proj.in_features)
        dh = int(getattr(cfg, "head_dim", None) or attn.q_proj.out_features // H)
        return body, H, Hkv, d, dh

    @staticmethod
    def weights(model):
        body, H, Hkv, d, dh = _Llama._dims(model)
        g = H // Hkv
        per = {k: [] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
        for blk in body.layers:
            a = blk.self_attn
            for k, lin, n in (("Q", a.q_proj, H), ("K", a.k_proj, Hkv), ("V", a.v_proj, Hkv)):
                W = lin.weight.reshape(n, dh, d).transpose(1, 2)
                b = None if lin.bias is None else lin.bias.reshape(n, dh)
                per[f"W_{k}"].append(W if n == H else _expand(W, g))
                per[f"b_{k}"].append(b if n == H or b is None else _expand(b, g))
            per["W_O"].append(a.o_proj.weight.T.reshape(H, dh, d))
            per["b_O"].append(a.o_proj.bias)
        return HeadWeights(**{k: _stack(v) for k, v in per.items()}, **_embed_unembed(body.embed_tokens.weight, _lm_head(model)),
                           W_pos=None, family="llama", kv_group=g)

    @staticmethod
    def masks(model, layer, head):
        body, H, Hkv, d, dh = _Llama._dims(model)
        _check_head(layer, head, len(body.layers), H)
        a = body.layers[layer].self_attn
        p = _prefix(model, a)
        kv = head // (H // Hkv)
        out = {}
        for n, lin, idx in (("q_proj", a.q_proj, head), ("k_proj", a.k_proj, kv), ("v_proj", a.v_proj, kv)):
            out[f"{p}{n}.weight"] = _mask(lin.weight, slice(idx * dh, (idx + 1) * dh))
            if lin.bias is not None:
                out[f"{p}{n}.bias"] = _mask(lin.bias, slice(idx * dh, (idx + 1) * dh))
        out[f"{p}o_proj.weight"] = _mask(a.o_proj.weight, (slice(None), slice(head * dh, (head + 1) * dh)))
        return out


class _Bridge(_Family):
    """TransformerLens ``TransformerBridge``: weights from its own properties, masks via the HF model."""

    name = "transformer_lens"

    @staticmethod
    def match(model):
        return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)

    @staticmethod
    def weights(model):
        def opt(attr):
            try:
                return getattr(model, attr)
            except (AttributeError, ValueError, RuntimeError):
                return None

        n_heads = int(model.cfg.n_heads)
        W_K = model.W_K
        group = n_heads // int(W_K.shape[1])
        b = {k: opt(f"b_{k}") for k in ("Q", "K", "V", "O")}
        return HeadWeights(
            W_Q=_f(model.W_Q), W_K=_f(_expand(W_K.transpose(0, 1), group).transpose(0, 1) if group > 1 else W_K),
            W_V=_f(_expand(model.W_V.transpose(0, 1), group).transpose(0, 1) if group > 1 else model.W_V),
            W_O=_f(model.W_O),
            b_Q=_f(b["Q"]),
            b_K=_f(b["K"] if b["K"] is None or group == 1 else _expand(b["K"].transpose(0, 1), group).transpose(0, 1)),
            b_V=_f(b["V"] if b["V"] is None or group == 1 else _expand(b["V"].transpose(0, 1), group).transpose(0, 1)),
            b_O=_f(b["O"]), **_embed_unembed(opt("W_E"), opt("W_U")), W_pos=_f(opt("W_pos")),
            family="transformer_lens", kv_group=group,
        )

    @staticmethod
    def masks(model, layer, head):
        # The head's entries are the parameters that TransformerLens' own per-head views
        # (attn.W_Q[head], ...) are computed from: found by differentiating a random functional
        # of those views, so whatever split/fused layout the bridge uses is followed exactly.
        n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
        _check_head(layer, head, n_layers, n_heads)
        attn = model.blocks[layer].attn
        params = [p for p in attn.parameters() if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}  # the names estimate_llc sees
        gen = torch.Generator().manual_seed(0)
        with torch.enable_grad():
            group = n_heads // int(attn.W_K.shape[0])
            total = 0.0
            for attr, index in (("W_Q", head), ("b_Q", head), ("W_K", head // group), ("b_K", head // group),
                                ("W_V", head // group), ("b_V", head // group), ("W_O", head)):
                try:
                    t = getattr(attn, attr)
                except (AttributeError, ValueError, RuntimeError):
                    t = None
                if t is None or not t.requires_grad:
                    continue
                t = t[index]
                total = total + (t * torch.randn(t.shape, generator=gen).to(t)).sum()
            grads = torch.autograd.grad(total, params, allow_unused=True)
        out = {}
        for p, g in zip(params, grads, strict=True):
            if g is not None and bool((g != 0).any()):
                out[names[id(p)]] = (g != 0).to(p.device)
        if not out:
            raise InvalidInputError(f"cannot locate the weights of head L{layer}H{head} in the TransformerBridge")
        return out


class _MHA(_Family):
    name = "mha"

    @staticmethod
    def _mhas(model):
        return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]

    @staticmethod
    def match(model):
        return bool(_MHA._mhas(model))

    @staticmethod
    def weights(model):
        mhas = _MHA._mhas(model)
        E, H = mhas[0].embed_dim, mhas[0].num_heads
        if any(m.embed_dim != E or m.num_heads != H for m in mhas):
            raise InvalidInputError("the nn.MultiheadAttention modules differ in width or heads")
        if any(not m._qkv_same_embed_dim for m in mhas):
            raise InvalidInputError("nn.MultiheadAttention with kdim/vdim != embed_dim is not supported")
        dh = E // H
        per = {k: [] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
        for m in mhas:
            W, b = m.in_proj_weight, m.in_proj_bias  # (3E, E): y = x @ W.T
            for i, k in enumerate(("Q", "K", "V")):
                per[f"W_{k}"].append(W[i * E:(i + 1) * E].reshape(H, dh, E).transpose(1, 2))
                per[f"b_{k}"].append(None if b is None else b[i * E:(i + 1) * E].reshape(H, dh))
            per["W_O"].append(m.out_proj.weight.T.reshape(H, dh, E))
            per["b_O"].append(m.out_proj.bias)
        embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)
                   and not any(m is mha.out_proj for mha in mhas)]
        W_E = embeds[0].weight if embeds and embeds[0].embedding_dim == E else None
        W_U = None
        if linears and linears[-1].in_features == E and W_E is not None and linears[-1].out_features == W_E.shape[0]:
            W_U = linears[-1].weight.T
        return HeadWeights(**{k: _stack(v) for k, v in per.items()}, **_embed_unembed(W_E, W_U),
                           W_pos=None, family="mha")

    @staticmethod
    def masks(model, layer, head):
        from devinterp.analyses.head_params import _mha_masks

        mhas = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if not 0 <= layer < len(mhas):
            raise InvalidInputError(f"no layer {layer}: the model has {len(mhas)} nn.MultiheadAttention modules")
        name, module = mhas[layer]
        if not 0 <= head < module.num_heads:
            raise InvalidInputError(f"no head {head} in layer {layer} ({name}): it has {module.num_heads} heads")
        return _mha_masks(name, module, head)


_FAMILIES: tuple[type[_Family], ...] = (_Ours, _Bridge, _GPT2, _NeoX, _Llama, _MHA)


def _family(model: nn.Module) -> type[_Family]:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for fam in _FAMILIES:
        if fam.match(model):
            return fam
    raise InvalidInputError(
        f"cannot locate the attention heads of {type(model).__name__}: supported are devinterp's "
        "AttentionOnlyTransformer, TransformerLens' TransformerBridge, HF GPT-2, GPT-NeoX/Pythia, "
        "Llama-style (q_proj/k_proj/v_proj/o_proj) models and nn.MultiheadAttention models; for others "
        "pass the weights yourself (HeadWeights(...)) or, for the LLC, head_params_from_projections(...)"
    )


def model_family(model: nn.Module) -> str:
    """The name of the adapter that reads ``model``'s heads (see the module docstring)."""
    return _family(model).name


def find_supported(module: nn.Module) -> nn.Module | None:
    """``module`` itself if its heads can be read, else its first submodule whose heads can
    (e.g. the network inside a LightningModule), else None."""
    for _, m in module.named_modules():
        for fam in _FAMILIES:
            if fam is not _MHA and fam.match(m):
                return m
    return module if _MHA.match(module) else None


def head_weights(model: nn.Module | HeadWeights) -> HeadWeights:
    """Every head's weights of ``model`` (see :class:`HeadWeights`); a ``HeadWeights`` passes through.

    Raises:
        InvalidInputError: The model's family is not supported.
    """
    if isinstance(model, HeadWeights):
        return model
    with torch.no_grad():
        return _family(model).weights(model)


def head_param_masks(model: nn.Module, layer: int, head: int) -> dict[str, Tensor]:
    """``{parameter name: bool mask}`` selecting head ``(layer, head)``'s weights in ``model``.

    A model's own ``head_param_masks(layer, head)`` method wins. Shared parameters (output biases,
    embeddings, LayerNorms) are not included; with grouped-query attention the head's shared
    key/value rows are (see the module docstring).
    """
    if hasattr(model, "head_param_masks") and callable(model.head_param_masks):
        return model.head_param_masks(layer, head)
    return _family(model).masks(model, layer, head)


