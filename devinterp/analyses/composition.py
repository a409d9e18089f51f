"""Circuits read from the weights: head composition, OV copying, positional QK circuits.

No data, no forward pass: every score is a function of the per-head weights that
:func:`devinterp.analyses.head_access.head_weights` reads (our model, TransformerLens' bridge,
HF GPT-2 / GPT-NeoX / Llama, ``nn.MultiheadAttention`` models), in the row-vector convention of
Elhage et al. (2021): a head's QK circuit is ``W_QK = W_Q W_Kᵀ``, its OV circuit ``W_OV = W_V W_O``
(both ``d_model × d_model``).

- :func:`composition_scores`: ``‖L·R‖_F / (‖L‖_F ‖R‖_F)`` with ``L = W_OV`` of the earlier head and
  ``R = W_QK`` (Q-composition), ``W_QKᵀ`` (K) or ``W_OV`` (V) of the later head — TransformerLens'
  ``all_composition_scores``, with NaN (not 0) where the later head is not in a later layer.
  :func:`composition_baseline` is the same score for random Gaussian matrices of the same shapes.
- :func:`ov_copying_scores`: ``Σλ / Σ|λ|`` over the eigenvalues of the full OV circuit
  ``W_E W_OV W_U`` (≈ 1: the head copies the token it attends to).
- :func:`qk_previous_token_scores`: attention to the previous position predicted by the positional
  QK circuit ``W_pos W_QK W_posᵀ`` (learned absolute positions only; NaN otherwise).
- :func:`weight_circuit_scalars`: all of them as TensorBoard scalars (``composition/K/L0H0->L1H1``,
  ``ov_copying/L1H0``, ``qk_previous_token/L0H1``), as ``CircuitCallback(weights=True)`` logs them.

LayerNorm is not folded (see :mod:`devinterp.analyses.head_access`); biases are left out (as in
TransformerLens' circuits).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from devinterp.analyses.head_access import HeadWeights, head_weights
from devinterp.errors import InvalidInputError

__all__ = [
    "composition_scores",
    "composition_baseline",
    "ov_copying_scores",
    "qk_previous_token_scores",
    "weight_circuit_scalars",
    "weight_scalars",
    "KINDS",
]

KINDS = ("Q", "K", "V")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidInputError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


def _r_factor(W: Tensor) -> Tensor:
    """``R`` of the thin QR ``W = Q R`` over the last two dims: ``‖X Wᵀ‖ = ‖X Rᵀ‖`` for any X."""
    return torch.linalg.qr(W, mode="r").R


def _left(hw: HeadWeights, dtype: torch.dtype) -> Tensor:
    """``R_V W_O`` ``(L, H, d_head, d_model)``: ``‖W_OV · X‖_F = ‖R_V W_O X‖_F`` for any X."""
    return _r_factor(hw.W_V.to(dtype)) @ hw.W_O.to(dtype)


def _right(hw: HeadWeights, kind: str, dtype: torch.dtype) -> Tensor:
    """``X R_Yᵀ`` ``(L, H, d_model, d_head)`` for the later head's ``R = X Yᵀ``: ``‖Z R‖ = ‖Z X R_Yᵀ‖``."""
    if kind == "Q":    # W_Q W_Kᵀ
        X, Y = hw.W_Q, hw.W_K
    elif kind == "K":  # (W_Q W_Kᵀ)ᵀ = W_K W_Qᵀ
        X, Y = hw.W_K, hw.W_Q
    else:              # W_V W_O = W_V (W_Oᵀ)ᵀ
        X, Y = hw.W_V, hw.W_O.transpose(-1, -2)
    return X.to(dtype) @ _r_factor(Y.to(dtype)).transpose(-1, -2)


def _pair_scores(A: Tensor, B: Tensor) -> np.ndarray:
    """``‖A[l1,h1] B[l2,h2]‖ / (‖A[l1,h1]‖ ‖B[l2,h2]‖)`` for l1 < l2, NaN elsewhere."""
    L, H, dh, d = A.shape
    dh_r = B.shape[-1]
    out = np.full((L, H, L, H), np.nan)
    a_norm = torch.linalg.matrix_norm(A)  # (L, H)
    b_norm = torch.linalg.matrix_norm(B)
    for l1 in range(L - 1):
        later = B[l1 + 1:]                                          # (L', H, d, dh)
        right = later.permute(2, 0, 1, 3).reshape(d, -1)            # (d, L' H dh)
        prod = A[l1].reshape(H * dh, d) @ right                     # (H dh, L' H dh)
        prod = prod.reshape(H, dh, L - l1 - 1, H, dh_r)
        num = prod.pow(2).sum(dim=(1, 4)).sqrt()                    # (H, L', H)
        den = a_norm[l1][:, None, None] * b_norm[l1 + 1:][None]
        out[l1, :, l1 + 1:, :] = (num / den).double().numpy()
    return out


def composition_scores(model, kind: str = "K", *, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Composition scores of every earlier head into every later head (Elhage et al., 2021).

    Entry ``[l1, h1, l2, h2]`` is ``‖W_OV(h1) · R(h2)‖_F / (‖W_OV(h1)‖_F ‖R(h2)‖_F)`` with
    ``R = W_Q W_Kᵀ`` for ``kind="Q"`` (h1's output read by h2's queries), ``(W_Q W_Kᵀ)ᵀ`` for ``"K"``
    (by its keys) and ``W_V W_O`` for ``"V"`` (by its values) — TransformerLens'
    ``all_composition_scores(kind)``. NaN where ``l2 <= l1`` (TransformerLens writes 0 there).
    Scores lie in ``[0, 1]``; compare them with :func:`composition_baseline`.

    Computed from the factors (``‖R_V W_O X R_Yᵀ‖`` with QR factors, ``d_head × d_head``
    products), never the ``d_model × d_model`` circuits.

    Args:
        model: A supported model (see :mod:`devinterp.analyses.head_access`) or a ``HeadWeights``.
        kind: ``"Q"``, ``"K"`` or ``"V"``.
        dtype: Precision of the products (float32, as TransformerLens; float64 for more digits).

    Returns:
        ``np.ndarray`` of shape ``(layers, heads, layers, heads)``.
    """
    _check_kind(kind)
    hw = head_weights(model)
    with torch.no_grad():
        return _pair_scores(_left(hw, dtype), _right(hw, kind, dtype))


def composition_baseline(model, kind: str = "K", *, num_samples: int = 256, seed: int = 0) -> float:
    """Mean composition score of random matrices with the model's shapes (to read scores against).

    ``W_Q, W_K, W_V, W_O`` are drawn i.i.d. Gaussian (``d_model × d_head`` / ``d_head × d_model``;
    the scale cancels) for ``num_samples`` independent head pairs, seeded by ``seed``. For
    ``d_model = 64, d_head = 16`` it is about 0.12; it shrinks roughly as ``1/√(d_model/d_head)``.

    Args:
        model: A supported model, a ``HeadWeights``, or a ``(d_model, d_head)`` pair.
        kind: ``"Q"``, ``"K"`` or ``"V"``.
        num_samples: Random pairs averaged over.
        seed: Seed of the draws.
    """
    _check_kind(kind)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise InvalidInputError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(model, tuple):
        d, dh = (int(x) for x in model)
    else:
        hw = head_weights(model)
        d, dh = hw.d_model, hw.d_head
    return _baseline(d, dh, kind, num_samples, int(seed))


@functools.lru_cache(maxsize=64)
def _baseline(d: int, dh: int, kind: str, num_samples: int, seed: int) -> float:
    """The random baseline (cached: it depends only on its arguments)."""
    gen = torch.Generator().manual_seed(seed)

    def heads() -> HeadWeights:  # num_samples independent heads, as (num_samples, 1) "layers x heads"
        def draw(*shape):
            return torch.randn(num_samples, 1, *shape, generator=gen, dtype=torch.float64)

        return HeadWeights(W_Q=draw(d, dh), W_K=draw(d, dh), W_V=draw(d, dh), W_O=draw(dh, d),
                           b_Q=None, b_K=None, b_V=None, b_O=None, W_E=None, W_U=None, W_pos=None,
                           family="random")

    with torch.no_grad():
        A = _left(heads(), torch.float64)[:, 0]          # earlier heads
        B = _right(heads(), kind, torch.float64)[:, 0]   # later heads: independent draws
        score = (torch.linalg.matrix_norm(A @ B) / torch.linalg.matrix_norm(A)
                 / torch.linalg.matrix_norm(B))
    return float(score.mean())


def ov_copying_scores(model) -> np.ndarray:
    """Copying score of every head's full OV circuit: ``Σλ / Σ|λ|`` over its eigenvalues.

    The full OV circuit ``W_E W_V W_O W_U`` (``vocab × vocab``: how attending to a token changes
    the logits) has the same non-zero eigenvalues as ``W_O (W_U W_E) W_V`` (``d_head × d_head``),
    which is what is decomposed. ``Σλ`` is real (the trace); the score lies in ``[-1, 1]``: ≈ 1 for
    a head that raises the logit of the token it attends to, ≈ -1 for one that suppresses it, ≈ 0
    without either (Elhage et al., 2021). Biases and LayerNorms are left out.

    Returns:
        ``np.ndarray`` ``(layers, heads)``.

    Raises:
        InvalidInputError: The model's embedding or unembedding could not be found.
    """
    hw = head_weights(model)
    if hw.W_E is None or hw.W_U is None:
        raise InvalidInputError(
            f"OV copying needs the token embedding and unembedding, and the {hw.family} adapter "
            "found " + ("neither" if hw.W_E is None and hw.W_U is None else
                        "no embedding" if hw.W_E is None else "no unembedding")
            + "; pass a HeadWeights with W_E and W_U")
    with torch.no_grad():
        C = (hw.W_U @ hw.W_E).double()                         # (d, d), summed over the vocabulary
        M = hw.W_O.double() @ C @ hw.W_V.double()              # (L, H, dh, dh)
        lam = torch.linalg.eigvals(M)                          # (L, H, dh) complex
        num = lam.real.sum(-1)
        den = lam.abs().sum(-1)
        score = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))
    return score.numpy()


#: Positions :func:`qk_previous_token_scores` uses by default (all of ``W_pos`` when it is shorter).
QK_POSITIONS = 128


def qk_previous_token_scores(model, *, seq_len: int | None = None) -> np.ndarray:
    """Attention to the previous position predicted by each head's positional QK circuit.

    With learned absolute positions ``W_pos``, the logits ``W_pos W_Q W_Kᵀ W_posᵀ / √d_head``
    (positions only, direct path, no biases or LayerNorm) give a causal softmax pattern per head;
    the score is its mean weight on position ``i − 1`` over query positions ``1 … T−1``, in
    ``[0, 1]``: a previous-token head built from positions scores near 1, a uniform head ~ ``H_T/T``.

    Models without learned absolute positions (rotary as in GPT-NeoX / Llama, ALiBi, none) have no
    positional QK circuit in the weights: every entry is NaN.

    Args:
        model: A supported model or a ``HeadWeights``.
        seq_len: Positions used, ``T`` (default the first :data:`QK_POSITIONS` = 128, or all of
            ``W_pos`` when it is shorter: the cost grows as ``T²``).

    Returns:
        ``np.ndarray`` ``(layers, heads)``.
    """
    hw = head_weights(model)
    if hw.W_pos is None:
        return np.full((hw.n_layers, hw.n_heads), np.nan)
    n = hw.W_pos.shape[0]
    T = min(n, QK_POSITIONS) if seq_len is None else seq_len
    if isinstance(T, bool) or not isinstance(T, int) or not 2 <= T <= n:
        raise InvalidInputError(f"seq_len must be an integer in [2, {n}], got {seq_len!r}")
    out = np.empty((hw.n_layers, hw.n_heads))
    with torch.no_grad():
        P = hw.W_pos[:T]
        causal = torch.zeros(T - 1, T, dtype=P.dtype).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril()[1:], -math.inf)   # rows 1..T-1
        for layer in range(hw.n_layers):  # one layer at a time: (heads, T, T) in memory
            q = P[1:] @ (hw.W_Q[layer] / math.sqrt(hw.d_head))           # (H, T-1, dh)
            k = P @ hw.W_K[layer]                                         # (H, T, dh)
            logits = q @ k.transpose(-1, -2) + causal                     # (H, T-1, T)
            prev = torch.diagonal(logits, dim1=-2, dim2=-1)               # [i-1, i-1]: key i-1 of query i
            out[layer] = (prev - torch.logsumexp(logits, dim=-1)).exp().mean(-1).double().numpy()
    return out


def weight_circuit_scalars(model, *, kinds: tuple[str, ...] = KINDS, copying: bool = True,
                           previous_token: bool = True) -> dict[str, float]:
    """Every weight-space circuit score as TensorBoard scalars.

    Tags: ``composition/{kind}/L{l1}H{h1}->L{l2}H{h2}`` for every pair with ``l1 < l2`` and
    ``composition/{kind}/max`` and ``composition/{kind}/baseline`` (:func:`composition_baseline`,
    64 samples, seed 0); ``ov_copying/L{l}H{h}`` (when the embedding and unembedding are
    found); ``qk_previous_token/L{l}H{h}`` (learned absolute positions only). For large models
    restrict ``kinds`` (a 12 × 12 model has 9,504 pairs per kind).
    """
    hw = head_weights(model)
    labels = [[f"L{layer}H{h}" for h in range(hw.n_heads)] for layer in range(hw.n_layers)]
    out: dict[str, float] = {}
    for kind in kinds:
        scores = composition_scores(hw, _check_kind(kind))
        for l1, h1, l2, h2 in zip(*np.nonzero(np.isfinite(scores)), strict=True):
            out[f"composition/{kind}/{labels[l1][h1]}->{labels[l2][h2]}"] = float(scores[l1, h1, l2, h2])
        if np.isfinite(scores).any():
            out[f"composition/{kind}/max"] = float(np.nanmax(scores))
            out[f"composition/{kind}/baseline"] = composition_baseline(hw, kind, num_samples=64, seed=0)
    if copying and hw.W_E is not None and hw.W_U is not None:
        for (layer, h), v in np.ndenumerate(ov_copying_scores(hw)):
            out[f"ov_copying/{labels[layer][h]}"] = float(v)
    if previous_token and hw.W_pos is not None:
        for (layer, h), v in np.ndenumerate(qk_previous_token_scores(hw)):
            out[f"qk_previous_token/{labels[layer][h]}"] = float(v)
    return out


def weight_scalars(model, weights: bool | str = "auto", kinds: tuple[str, ...] = KINDS) -> dict[str, float]:
    """:func:`weight_circuit_scalars` of ``model`` or of its first submodule whose heads can be read.

    Args:
        model: An ``nn.Module`` (e.g. a LightningModule holding the network).
        weights: ``"auto"``: ``{}`` when no heads can be located; ``True``: then raise; ``False``:
            always ``{}``.
        kinds: Composition kinds.
    """
    if weights is False:
        return {}
    from devinterp.analyses.head_access import find_supported

    target = find_supported(model)
    if target is None:
        if weights == "auto":
            return {}
        target = model  # raises the family error
    return weight_circuit_scalars(target, kinds=kinds)
