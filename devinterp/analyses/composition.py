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
    "composition_scores_by_kind",
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
    """``F`` ``(dh × dh)`` with ``FᵀF = WᵀW`` over the last two dims: ``‖X Wᵀ‖ = ‖X Fᵀ‖`` for any X.

    The Cholesky factor of the ``d_head × d_head`` Gram matrix, taken in float64 (the ``R`` of a QR
    of ``W``, up to signs, at a fifth of the cost); an eigen square root for rank-deficient ``W``.
    """
    G = (W.mT @ W).double()
    L, info = torch.linalg.cholesky_ex(G)
    bad = info != 0
    if bad.any():
        lam, U = torch.linalg.eigh(G[bad])
        L[bad] = U * lam.clamp_min(0).sqrt()[..., None, :]      # (U Λ^½)(U Λ^½)ᵀ = G
    return L.mT.to(W.dtype)


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


def _rights(hw: HeadWeights, kinds: tuple[str, ...], dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
    """:func:`_right` of every kind, as views of one ``(L, kinds, H, d_head, d_model)`` buffer.

    The Gram route reads the later heads as rows ``(layer, kind, head)`` of ``(d_head, d_model)``
    factors; writing each ``R_Y Xᵀ`` straight into that layout spares a copy of all of them.

    Returns:
        ``([B per kind (L, H, d, dh) views], rows ((L - 1) · kinds · H, dh, d))``.
    """
    X = {"Q": hw.W_Q, "K": hw.W_K, "V": hw.W_V}
    Y = {"Q": hw.W_K, "K": hw.W_Q, "V": hw.W_O.transpose(-1, -2)}
    L, H, d, dh = hw.W_Q.shape
    buf = torch.empty(L, len(kinds), H, dh, d, dtype=dtype)
    for j, kind in enumerate(kinds):
        R = _r_factor(Y[kind].to(dtype))                            # (L, H, dh, dh)
        Xt = X[kind].to(dtype).transpose(-1, -2)                    # (L, H, dh, d)
        for layer in range(L):
            torch.bmm(R[layer], Xt[layer], out=buf[layer, j])        # R_Y Xᵀ = (X R_Yᵀ)ᵀ
    return [buf[:, j].transpose(-1, -2) for j in range(len(kinds))], buf[1:].reshape(-1, dh, d)


def _pair_scores(A: Tensor, Bs: list[Tensor], route: str | None = None,
                 rows: Tensor | None = None) -> list[np.ndarray]:
    """``‖A[l1,h1] B[l2,h2]‖ / (‖A[l1,h1]‖ ‖B[l2,h2]‖)`` for l1 < l2 (NaN elsewhere), one array per B.

    ``A`` ``(L, H, dh, d)`` (earlier heads), each ``B`` ``(L, H, d, dh')`` (later heads). Two exact
    routes, the cheaper one for the shapes (``route`` forces one; tests use it):

    - ``"cross"``: every product ``A_i B_j`` (``d_head × d_head``): ``d · dh · dh'`` per pair.
    - ``"gram"``: ``‖A_i B_j‖² = ⟨A_iᵀA_i, B_j B_jᵀ⟩`` (``d × d`` Gram matrices, symmetric, so only
      their upper block triangle): ``≈ d²/2`` per pair plus ``≈ d² · dh/2`` per head to form them —
      cheaper once ``d < 2 · dh · dh'`` (GPT-2 small: 768 < 8192).

    ``rows``: the later heads already laid out as :func:`_rights` returns them (spares a copy).
    """
    L, H, dh, d = A.shape
    if L < 2:
        return [np.full((L, H, L, H), np.nan) for _ in Bs]
    if route is None:
        n, pairs, k = (L - 1) * H, (L - 1) * L // 2 * H * H, len(Bs)
        cross = k * pairs * d * dh * max(B.shape[-1] for B in Bs)
        gram = (n * (1 + k) * dh * d * d + k * pairs * d * d) / 2
        route = "gram" if gram < cross else "cross"
    a_norm = torch.linalg.matrix_norm(A)                                    # (L, H)
    outs = []
    sq = _gram_squares(A, Bs, rows) if route == "gram" else [_cross_squares(A, B) for B in Bs]
    for B, s2 in zip(Bs, sq, strict=True):
        den = a_norm[:-1].reshape(-1, 1) * torch.linalg.matrix_norm(B)[1:].reshape(1, -1)
        rel = s2 / den.square()                                             # (n, n): score²
        if route == "gram":  # ⟨P, Q⟩ loses ~eps·‖P‖‖Q‖: recompute near-zero scores exactly
            rel = _refine_small(rel, A, B)
        score = rel.clamp_min(0).sqrt().double().numpy().reshape(L - 1, H, L - 1, H)
        out = np.full((L, H, L, H), np.nan)
        for l1 in range(L - 1):
            out[l1, :, l1 + 1:, :] = score[l1, :, l1:, :]
        outs.append(out)
    return outs


#: Below this score² (score < 0.003) the Gram route's rounding (~1e-8 of ‖A‖²‖B‖² in float32) could show in
#: the score's 5th digit, so those pairs are recomputed from their products.
_REFINE_BELOW = 1e-5


def _cross_squares(A: Tensor, B: Tensor) -> Tensor:
    """``‖A_i B_j‖²`` for earlier heads i (layers 0..L-2) and later heads j (layers 1..L-1)."""
    L, H, dh, d = A.shape
    dh_r = B.shape[-1]
    out = torch.zeros((L - 1) * H, (L - 1) * H, dtype=A.dtype)
    for l1 in range(L - 1):
        later = B[l1 + 1:]                                          # (L', H, d, dh)
        right = later.permute(2, 0, 1, 3).reshape(d, -1)            # (d, L' H dh)
        prod = A[l1].reshape(H * dh, d) @ right                     # (H dh, L' H dh)
        prod = prod.reshape(H, dh, L - l1 - 1, H, dh_r)
        out[l1 * H:(l1 + 1) * H, l1 * H:] = prod.pow(2).sum(dim=(1, 4)).reshape(H, -1)
    return out


#: Block edge of the Gram route: the ``d × d`` Gram matrices are formed ``block × block`` at a time
#: (upper block triangle only), so memory stays ``O(heads · block²)`` (≈ 20 MB at 12 × 12) and the
#: tiles stay in cache between forming them and taking their inner products. Smaller blocks waste
#: less on the diagonal (``(m + 1) / 2m`` of the full square for ``m`` blocks, 56 % at 768 / 96)
#: but multiply in smaller pieces.
_GRAM_BLOCK = 96

#: Later layers per inner-product multiply: a group of ``g`` reader layers is multiplied against
#: every earlier layer of its last member (the few pairs with ``l1 ≥ l2`` inside a group are
#: computed and dropped), so each product has ``g · kinds · heads`` columns instead of ``kinds · heads``.
_GRAM_GROUP = 2


def _gram_squares(A: Tensor, Bs: list[Tensor], rows: Tensor | None = None) -> list[Tensor]:
    """``‖A_i B_j‖² = ⟨A_iᵀ A_i, B_j B_jᵀ⟩_F`` for all pairs (layer-upper-triangular), every B at once.

    Entries with ``l1 ≥ l2`` are not meaningful (some are never computed, some are by-products).
    """
    L, H, dh, d = A.shape
    n, k = (L - 1) * H, len(Bs)
    left = A[:-1].reshape(n, dh, d)
    # later heads, grouped by layer then kind: rows (layer, kind, head), so one product per layer group
    # (``rows``: that layout already, from :func:`_rights`)
    right = rows if rows is not None else torch.stack([B[1:].transpose(-1, -2) for B in Bs], dim=1).reshape(
        n * k, -1, d)
    edges = list(range(0, d, _GRAM_BLOCK)) + [d]
    blocks = list(zip(edges, edges[1:], strict=False))
    w_max = max(b - a for a, b in blocks)
    buf_p = torch.empty(n * w_max * w_max, dtype=A.dtype)
    buf_q = torch.empty(n * k * w_max * w_max, dtype=A.dtype)
    acc = torch.zeros(n, n * k, dtype=A.dtype)
    readers = list(range(1, L))                                  # later layer l2 = column group l2 - 1
    groups = [readers[i:i + _GRAM_GROUP] for i in range(0, len(readers), _GRAM_GROUP)]
    for i, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[i:]:
            w1, w2 = a1 - a0, b1 - b0
            P = buf_p[:n * w1 * w2].view(n, w1, w2)
            Q = buf_q[:n * k * w1 * w2].view(n * k, w1, w2)
            torch.bmm(left[:, :, a0:a1].transpose(1, 2), left[:, :, b0:b1], out=P)
            torch.bmm(right[:, :, a0:a1].transpose(1, 2), right[:, :, b0:b1], out=Q)
            Pv, Qv = P.view(n, -1), Q.view(n * k, -1)
            weight = 1.0 if a0 == b0 else 2.0     # an off-diagonal block stands for its mirror too
            for g in groups:                      # later layers g read earlier layers 0..g[-1]-1
                rows, cols = slice(0, g[-1] * H), slice((g[0] - 1) * k * H, g[-1] * k * H)
                acc[rows, cols].addmm_(Pv[rows], Qv[cols].T, alpha=weight)
    acc = acc.view(n, L - 1, k, H)
    return [acc[:, :, j].reshape(n, n) for j in range(k)]


def _refine_small(rel: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """Recompute, from the products ``A_i B_j``, the valid pairs whose score² is below the cutoff."""
    L, H, dh, d = A.shape
    n = (L - 1) * H
    valid = torch.ones(L - 1, L - 1, dtype=torch.bool).triu().repeat_interleave(H, 0).repeat_interleave(H, 1)
    ii, jj = torch.nonzero(valid & (rel < _REFINE_BELOW), as_tuple=True)
    if ii.numel() == 0:
        return rel
    left, right = A[:-1].reshape(n, dh, d), B[1:].reshape(n, d, -1)
    a_n, b_n = torch.linalg.matrix_norm(left), torch.linalg.matrix_norm(right)
    rel = rel.clone()
    for c in range(0, ii.numel(), 256):
        i, j = ii[c:c + 256], jj[c:c + 256]
        prod = torch.bmm(left[i], right[j])
        rel[i, j] = (torch.linalg.matrix_norm(prod) / (a_n[i] * b_n[j])).square()
    return rel


def composition_scores_by_kind(model, kinds: tuple[str, ...] = KINDS, *,
                               dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """:func:`composition_scores` for several kinds at once (the earlier heads' side is shared).

    Returns:
        ``{kind: np.ndarray (layers, heads, layers, heads)}``.
    """
    kinds = tuple(_check_kind(k) for k in kinds)
    hw = head_weights(model)
    with torch.no_grad():
        Bs, rows = _rights(hw, kinds, dtype)
        scores = _pair_scores(_left(hw, dtype), Bs, rows=rows)
    return dict(zip(kinds, scores, strict=True))


def composition_scores(model, kind: str = "K", *, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Composition scores of every earlier head into every later head (Elhage et al., 2021).

    Entry ``[l1, h1, l2, h2]`` is ``‖W_OV(h1) · R(h2)‖_F / (‖W_OV(h1)‖_F ‖R(h2)‖_F)`` with
    ``R = W_Q W_Kᵀ`` for ``kind="Q"`` (h1's output read by h2's queries), ``(W_Q W_Kᵀ)ᵀ`` for ``"K"``
    (by its keys) and ``W_V W_O`` for ``"V"`` (by its values) — TransformerLens'
    ``all_composition_scores(kind)``. NaN where ``l2 <= l1`` (TransformerLens writes 0 there).
    Scores lie in ``[0, 1]``; compare them with :func:`composition_baseline`.

    Computed from the factors, never the ``d_model × d_model`` circuits: with QR factors,
    ``‖W_OV(h1) R(h2)‖ = ‖A B‖`` for ``A = R_V W_O`` (``d_head × d_model``) and ``B = X R_Yᵀ``
    (``d_model × d_head``), and ``‖A B‖²`` is either summed from the ``d_head × d_head`` product or
    read as ``⟨AᵀA, B Bᵀ⟩`` from (block upper-triangular) Gram matrices, whichever costs less;
    near-zero scores are always taken from the product. All of Q, K, V at once:
    :func:`composition_scores_by_kind`.

    Args:
        model: A supported model (see :mod:`devinterp.analyses.head_access`) or a ``HeadWeights``.
        kind: ``"Q"``, ``"K"`` or ``"V"``.
        dtype: Precision of the products (float32, as TransformerLens; float64 for more digits).

    Returns:
        ``np.ndarray`` of shape ``(layers, heads, layers, heads)``.
    """
    return composition_scores_by_kind(model, (_check_kind(kind),), dtype=dtype)[kind]


def composition_baseline(model, kind: str = "K", *, num_samples: int = 256, seed: int = 0) -> float:
    """Mean composition score of random matrices with the model's shapes (to read scores against).

    ``W_Q, W_K, W_V, W_O`` drawn i.i.d. Gaussian (``d_model × d_head`` / ``d_head × d_model``; the
    scale cancels), ``num_samples`` independent head pairs, seeded by ``seed``. The three kinds
    have the same distribution (each score is ``‖R_V W_O X R_Yᵀ‖ / (‖R_V W_O‖ ‖X R_Yᵀ‖)`` with four
    independent Gaussian factors), so one draw serves all three. It is sampled in ``d_head``
    dimensions — Bartlett factors of the Wishart Gram matrices and the ``d_head × d_head``
    Gaussian block of ``W_O X`` (rotation invariance) — so it costs the same at any ``d_model``.
    For ``d_model = 64, d_head = 16`` it is about 0.12; it shrinks roughly as ``√(d_head/d_model)``.

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
    return _baseline(d, dh, num_samples, int(seed))


def _bartlett(rng: np.random.Generator, n: int, m: int, p: int) -> np.ndarray:
    """``n`` upper-triangular ``R`` ``(p × p)`` with ``RᵀR ~ Wishart(I_p, m)`` (= ``WᵀW``, ``W`` ``m × p`` Gaussian)."""
    R = rng.standard_normal((n, p, p))
    R *= np.triu(np.ones((p, p)), 1)                   # in place: the strictly upper triangle
    R[:, np.arange(p), np.arange(p)] = np.sqrt(rng.chisquare(m - np.arange(p), size=(n, p)))
    return R


@functools.lru_cache(maxsize=64)
def _baseline(d: int, dh: int, num_samples: int, seed: int) -> float:
    """The random baseline (cached: it depends only on its arguments)."""
    return float(np.mean(_baseline_samples(d, dh, num_samples, seed, reduced=d >= 2 * dh)))


def _baseline_samples(d: int, dh: int, n: int, seed: int, *, reduced: bool) -> np.ndarray:
    """``n`` composition scores of independent Gaussian head pairs (``reduced``: in ``d_head`` dims)."""
    rng = np.random.default_rng(seed)
    if reduced:
        # Earlier head: A = R_V W_O; W_O = R_Oᵀ Q_Oᵀ (QR of the Gaussian W_Oᵀ), Q_O uniformly random.
        # Later head: B = X R_Yᵀ; in the frame [Q_O, Q_⊥], X = [G; H] with G (dh × dh) and H
        # ((d - dh) × dh) Gaussian and independent of Q_O. So A B = R_V R_Oᵀ G R_Yᵀ,
        # ‖A‖ = ‖R_V R_Oᵀ‖ and ‖B‖² = ‖G R_Yᵀ‖² + ‖S R_Yᵀ‖² with SᵀS = HᵀH (needs d - dh ≥ dh).
        R_V, R_O, R_Y = (torch.from_numpy(_bartlett(rng, n, d, dh)) for _ in range(3))
        S = torch.from_numpy(_bartlett(rng, n, d - dh, dh))
        G = torch.from_numpy(rng.standard_normal((n, dh, dh)))
        left = R_V @ R_O.mT                              # torch: batched BLAS on transposed views
        GY, SY = G @ R_Y.mT, S @ R_Y.mT
        num = torch.linalg.matrix_norm(left @ GY)
        den = torch.linalg.matrix_norm(left) * (GY.square().sum((1, 2)) + SY.square().sum((1, 2))).sqrt()
        return (num / den).numpy()
    W_V, W_O, X, Y = (torch.from_numpy(rng.standard_normal((n, *shape)))
                      for shape in ((d, dh), (dh, d), (d, dh), (d, dh)))
    with torch.no_grad():
        A = _r_factor(W_V) @ W_O
        B = X @ _r_factor(Y).mT
        score = torch.linalg.matrix_norm(A @ B) / torch.linalg.matrix_norm(A) / torch.linalg.matrix_norm(B)
    return score.numpy()


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
        C = _unembed_embed(hw.W_U, hw.W_E)                     # (d, d), summed over the vocabulary
        L, H, dh, d = hw.W_O.shape
        WOC = (hw.W_O.reshape(L * H * dh, d).to(C.dtype) @ C).reshape(L, H, dh, d)
        M = (WOC @ hw.W_V.to(C.dtype)).double()                # (L, H, dh, dh)
        lam = torch.linalg.eigvals(M)                          # (L, H, dh) complex
        num = lam.real.sum(-1)
        den = lam.abs().sum(-1)
        score = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))
    return score.numpy()


def _tied(W_U: Tensor, W_E: Tensor) -> bool:
    """Whether ``W_U = W_Eᵀ`` exactly: O(1) when ``W_U`` is a transposed view of ``W_E`` (as
    :func:`~devinterp.analyses.head_access.head_weights` gives for tied models), else one comparison
    (after a cheap look at one column, so an untied pair is rejected at once)."""
    V, d = W_E.shape
    if W_U.shape != (d, V) or W_U.dtype != W_E.dtype or W_U.device != W_E.device:
        return False
    if W_U.data_ptr() == W_E.data_ptr() and W_U.stride() == (W_E.stride(1), W_E.stride(0)):
        return True
    return bool(torch.equal(W_U[:, 0], W_E[0])) and bool(torch.equal(W_U, W_E.T))


def _unembed_embed(W_U: Tensor, W_E: Tensor) -> Tensor:
    """``W_U W_E`` (``d × d``), the ``vocab · d²`` step of OV copying; half of it when tied.

    With tied embeddings (``W_U = W_Eᵀ``, as GPT-2) the product is the Gram matrix ``W_Eᵀ W_E``,
    a symmetric rank-k update: BLAS ``syrk`` computes one triangle (``vocab · d(d+1)/2``
    multiply-adds, half of the product). Torch has no ``syrk``; NumPy's ``matmul`` calls it for
    ``aᵀ @ a`` on one buffer, so a CPU ``W_E`` goes through NumPy without a copy.
    """
    W_E = W_E.to(W_U.dtype)
    if not _tied(W_U, W_E):
        return W_U @ W_E
    if W_E.device.type == "cpu" and W_E.dtype in (torch.float32, torch.float64) and not W_E.requires_grad:
        E = W_E.contiguous().numpy()
        return torch.from_numpy(E.T @ E)                       # NumPy: syrk, both triangles filled
    return W_E.T @ W_E


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


@functools.lru_cache(maxsize=16)
def _pair_tags(n_layers: int, n_heads: int) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """Indices and ``L{l1}H{h1}->L{l2}H{h2}`` names of every ``l1 < l2`` pair (cached per shape: the
    9,504 names per kind of a 12 × 12 model took longer to format than a kind's scores at d_model 192)."""
    later = np.triu(np.ones((n_layers, n_layers), dtype=bool), 1)[:, None, :, None]
    index = np.nonzero(np.broadcast_to(later, (n_layers, n_heads, n_layers, n_heads)))
    return index, tuple(f"L{a}H{b}->L{c}H{d}" for a, b, c, d in zip(*index, strict=True))


def weight_circuit_scalars(model, *, kinds: tuple[str, ...] = KINDS, copying: bool = True,
                           previous_token: bool = True) -> dict[str, float]:
    """Every weight-space circuit score as TensorBoard scalars.

    Tags: ``composition/{kind}/L{l1}H{h1}->L{l2}H{h2}`` for every pair with ``l1 < l2`` and
    ``composition/{kind}/max`` and ``composition/{kind}/baseline`` (:func:`composition_baseline`,
    256 samples, seed 0: the same for the three kinds); ``ov_copying/L{l}H{h}`` (when the embedding and unembedding are
    found); ``qk_previous_token/L{l}H{h}`` (learned absolute positions only). For large models
    restrict ``kinds`` (a 12 × 12 model has 9,504 pairs per kind).
    """
    hw = head_weights(model)
    labels = [[f"L{layer}H{h}" for h in range(hw.n_heads)] for layer in range(hw.n_layers)]
    out: dict[str, float] = {}
    index, names = _pair_tags(hw.n_layers, hw.n_heads)
    for kind, scores in composition_scores_by_kind(hw, tuple(kinds)).items():
        values = scores[index]                               # every l1 < l2 pair, in C order
        finite = np.isfinite(values)
        out.update((f"composition/{kind}/{name}", v) for name, v, ok
                   in zip(names, values.tolist(), finite.tolist(), strict=True) if ok)
        if finite.any():
            out[f"composition/{kind}/max"] = float(np.nanmax(scores))
            out[f"composition/{kind}/baseline"] = composition_baseline(hw, kind, num_samples=256, seed=0)
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
