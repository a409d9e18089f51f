"""Weight-space circuits (issue 15): the per-head weight access, composition / OV / QK scores.

References used: TransformerLens' own ``all_composition_scores`` and ``W_Q ... W_U`` (an
independent reading of the same HF weights), dense ``d_model × d_model`` / ``vocab × vocab``
circuits computed in float64, hand-built weights with a known answer, and the symmetries the scores
must respect.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from client_models import needs_hf, needs_tl, tiny_gpt2, tiny_llama, tiny_neox, tl_bridge
from torch import nn

from devinterp.analyses import (
    HeadWeights,
    composition_baseline,
    composition_scores,
    composition_scores_by_kind,
    head_weights,
    ov_copying_scores,
    qk_previous_token_scores,
    weight_circuit_scalars,
)
from devinterp.analyses.head_access import find_supported, model_family
from devinterp.errors import InvalidInputError
from devinterp.models import AttentionOnlyTransformer


def _random_weights(L, H, d, dh, *, vocab=None, n_ctx=None, seed=0, dtype=torch.float64) -> HeadWeights:
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    return HeadWeights(W_Q=r(L, H, d, dh), W_K=r(L, H, d, dh), W_V=r(L, H, d, dh), W_O=r(L, H, dh, d),
                       b_Q=None, b_K=None, b_V=None, b_O=None,
                       W_E=None if vocab is None else r(vocab, d), W_U=None if vocab is None else r(d, vocab),
                       W_pos=None if n_ctx is None else r(n_ctx, d), family="test")


def _dense_composition(hw: HeadWeights, kind: str) -> np.ndarray:
    """The definition, literally: explicit d_model × d_model circuits in float64."""
    Q, K, V, Wo = (np.asarray(t, dtype=np.float64) for t in (hw.W_Q, hw.W_K, hw.W_V, hw.W_O))
    L, H = Q.shape[:2]
    out = np.full((L, H, L, H), np.nan)
    for l1 in range(L):
        for h1 in range(H):
            left = V[l1, h1] @ Wo[l1, h1]
            for l2 in range(l1 + 1, L):
                for h2 in range(H):
                    qk = Q[l2, h2] @ K[l2, h2].T
                    right = {"Q": qk, "K": qk.T, "V": V[l2, h2] @ Wo[l2, h2]}[kind]
                    out[l1, h1, l2, h2] = (np.linalg.norm(left @ right)
                                           / np.linalg.norm(left) / np.linalg.norm(right))
    return out


# ----------------------------------------------------------------------------------------------
# against TransformerLens
# ----------------------------------------------------------------------------------------------
@needs_tl
@pytest.mark.parametrize("build,seed,layers", [(tiny_gpt2, 0, 3), (tiny_gpt2, 7, 2), (tiny_neox, 1, 3),
                                               (tiny_llama, 2, 3)])
def test_composition_equals_transformer_lens(build, seed, layers, tmp_path):
    hf = build(n_layers=layers, seed=seed)
    ours_hf = {k: composition_scores(hf, k) for k in "QKV"}  # before the bridge wraps the model
    bridge = tl_bridge(hf, tmp_path)
    assert model_family(bridge) == "transformer_lens"
    assert not bridge.cfg.layer_norm_folding  # like with like: neither side folds LayerNorm
    for kind in "QKV":
        tl = bridge.all_composition_scores(kind).scores.detach().double().numpy()
        ours = composition_scores(bridge, kind)
        assert ours.shape == tl.shape == (layers, 4, layers, 4)
        later = np.arange(layers)[:, None, None, None] < np.arange(layers)[None, None, :, None]
        later = np.broadcast_to(later, ours.shape)
        assert np.isnan(ours[~later]).all() and (tl[~later] == 0).all()
        np.testing.assert_allclose(ours[later], tl[later], atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours_hf[kind][later], tl[later], atol=1e-4, rtol=0)


@needs_tl
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_neox, tiny_llama])
def test_hf_layouts_agree_with_transformer_lens(build, tmp_path):
    """Our reading of the fused / interleaved / grouped HF weights is TransformerLens' reading."""
    hf = build(seed=3)
    ours = head_weights(hf)
    tl = head_weights(tl_bridge(hf, tmp_path))
    for name in ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U", "W_pos"):
        a, b = getattr(ours, name), getattr(tl, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    if build is tiny_llama:
        assert ours.kv_group == 2 and torch.equal(ours.W_K[0, 2], ours.W_K[0, 3])


@needs_tl
def test_compatibility_mode_folded_weights_still_match(tmp_path):
    """With TransformerLens' LayerNorm folding on, we read the bridge's folded weights."""
    bridge = tl_bridge(tiny_gpt2(n_layers=3, seed=4), tmp_path)
    try:
        bridge.enable_compatibility_mode(disable_warnings=True)
    except Exception as err:  # pragma: no cover - depends on the TL version
        pytest.skip(f"compatibility mode unavailable offline: {err}")
    for kind in "QK":
        tl = bridge.all_composition_scores(kind).scores.detach().double().numpy()
        ours = composition_scores(bridge, kind)
        ok = np.isfinite(ours)
        np.testing.assert_allclose(ours[ok], tl[ok], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# the definition, on weights we did not design, and its symmetries
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,H,d,dh,seed", [(3, 4, 32, 8, 0), (2, 3, 20, 7, 1), (4, 2, 16, 16, 2)])
def test_composition_equals_the_dense_definition(L, H, d, dh, seed):
    hw = _random_weights(L, H, d, dh, seed=seed)
    for kind in "QKV":
        np.testing.assert_allclose(composition_scores(hw, kind, dtype=torch.float64),
                                   _dense_composition(hw, kind), atol=1e-10, equal_nan=True)
        np.testing.assert_allclose(composition_scores(hw, kind), _dense_composition(hw, kind),
                                   atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("L,H,d,dh,seed", [(3, 4, 40, 6, 3), (4, 3, 300, 8, 4)])
def test_both_product_routes_equal_the_dense_definition(L, H, d, dh, seed):
    """The product route and the Gram route (block upper triangle, more than one block at d = 300)
    give the definition; near-zero pairs are refined from the products (planted zeros stay 0)."""
    from devinterp.analyses.composition import _left, _pair_scores, _right

    hw = _random_weights(L, H, d, dh, seed=seed)
    W_O = hw.W_O.clone()
    W_O[0, 0] = 0.0 * W_O[0, 0]
    W_O[0, 0, :, :dh] = torch.eye(dh, dtype=W_O.dtype)        # OV(L0H0) writes into 6 or 8 basis directions
    W_K, W_Q = hw.W_K.clone(), hw.W_Q.clone()
    W_K[1, 0], W_Q[1, 0] = 0.0 * W_K[1, 0], 0.0 * W_Q[1, 0]
    W_K[1, 0, dh:2 * dh], W_Q[1, 0, dh:2 * dh] = torch.eye(dh), torch.eye(dh)   # L1H0 reads others only
    hw = HeadWeights(W_Q=W_Q, W_K=W_K, W_V=hw.W_V, W_O=W_O, b_Q=None, b_K=None, b_V=None, b_O=None,
                     W_E=None, W_U=None, W_pos=None, family="test")
    dense = {k: _dense_composition(hw, k) for k in "QKV"}
    assert dense["K"][0, 0, 1, 0] == 0.0
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 2e-6)):
        A, Bs = _left(hw, dtype), [_right(hw, k, dtype) for k in "QKV"]
        for route in ("cross", "gram"):
            for kind, got in zip("QKV", _pair_scores(A, Bs, route=route), strict=True):
                np.testing.assert_allclose(got, dense[kind], atol=atol, equal_nan=True, err_msg=route)
                if kind != "V":   # L1H0's values read everything
                    assert got[0, 0, 1, 0] < atol
    both = composition_scores_by_kind(hw)
    for kind in "QKV":
        np.testing.assert_array_equal(both[kind], composition_scores(hw, kind))


def test_tied_unembedding_is_the_embedding_gram_matrix():
    """Tied (a view of W_E, or an equal copy): the syrk Gram matrix; untied or off by one entry: W_U W_E."""
    from devinterp.analyses.composition import _tied, _unembed_embed

    g = torch.Generator().manual_seed(8)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        W_E = torch.randn(500, 300, generator=g, dtype=dtype)
        want = (W_E.T.double() @ W_E.double()).to(dtype)
        for W_U in (W_E.T, W_E.T.clone(), W_E.T.contiguous()):
            assert _tied(W_U, W_E)
            got = _unembed_embed(W_U, W_E)
            assert got.dtype == dtype and torch.equal(got, got.T)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=tol)
        near = W_E.T.clone()
        near[7, 11] += 1.0                       # equal except one entry: not tied
        assert not _tied(near, W_E)
        np.testing.assert_allclose(_unembed_embed(near, W_E), near @ W_E, rtol=1e-5, atol=tol)
        W_U = torch.randn(300, 500, generator=g, dtype=dtype)
        assert not _tied(W_U, W_E)
        np.testing.assert_allclose(_unembed_embed(W_U, W_E), W_U @ W_E, rtol=1e-5, atol=tol)


@needs_hf
def test_tied_hf_unembedding_is_a_view_of_the_one_embedding_copy():
    """GPT-2 ties lm_head to wte: W_U comes back as W_E's transposed view (one copy, tie seen in O(1)),
    a copy all the same (training the model on does not move it), and OV copying is unchanged."""
    hf = tiny_gpt2(n_layers=2, seed=3)
    hw = head_weights(hf)
    assert hw.W_U.data_ptr() == hw.W_E.data_ptr() and torch.equal(hw.W_U, hw.W_E.T)
    assert hw.W_E.data_ptr() != hf.transformer.wte.weight.data_ptr()
    untied = HeadWeights(**{**hw.__dict__, "W_U": hw.W_U.clone()})
    np.testing.assert_allclose(ov_copying_scores(hw), ov_copying_scores(untied), atol=1e-5)


def test_later_heads_written_in_place_equal_the_factors():
    """_rights writes every kind's R_Y Xᵀ into one (layer, kind, head) buffer: the same as _right."""
    from devinterp.analyses.composition import _right, _rights

    hw = _random_weights(3, 2, 20, 5, seed=9)
    Bs, rows = _rights(hw, ("K", "V"), torch.float64)
    for kind, B in zip("KV", Bs, strict=True):
        torch.testing.assert_close(B, _right(hw, kind, torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.view(2, 2, 2, 5, 20)[:, 1], Bs[1][1:].mT)


def test_scores_are_invariant_under_the_models_symmetries():
    """A rotation of the residual stream and a per-head change of basis leave every circuit alone."""
    hw = _random_weights(3, 2, 12, 4, vocab=10, n_ctx=9, seed=5)
    g = torch.Generator().manual_seed(6)
    R = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64)).Q
    M = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    N = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    moved = HeadWeights(
        W_Q=R.T @ hw.W_Q @ M, W_K=R.T @ hw.W_K @ torch.linalg.inv(M).T, W_V=R.T @ hw.W_V @ N,
        W_O=torch.linalg.inv(N) @ hw.W_O @ R, b_Q=None, b_K=None, b_V=None, b_O=None,
        W_E=hw.W_E @ R, W_U=R.T @ hw.W_U, W_pos=hw.W_pos @ R, family="test")
    for kind in "QKV":
        np.testing.assert_allclose(composition_scores(moved, kind, dtype=torch.float64),
                                   composition_scores(hw, kind, dtype=torch.float64), atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(ov_copying_scores(moved), ov_copying_scores(hw), atol=1e-9)
    np.testing.assert_allclose(qk_previous_token_scores(moved), qk_previous_token_scores(hw), atol=1e-9)


def test_planted_k_composition():
    """L0H0 writes into a subspace S that L1H1's keys read (its queries read S⊥): K = 1/√d_head, Q = 0."""
    d, dh = 16, 4
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    S, T, U, P = basis[:, :4], basis[:, 4:8], basis[:, 8:12], basis[:, 12:16]
    hw = _random_weights(2, 2, d, dh, seed=1)
    W_V, W_O, W_Q, W_K = hw.W_V.clone(), hw.W_O.clone(), hw.W_Q.clone(), hw.W_K.clone()
    W_V[0, 0], W_O[0, 0] = U, S.T        # OV(L0H0) = U Sᵀ: reads U, writes S
    W_V[0, 1], W_O[0, 1] = U, T.T        # OV(L0H1): writes T
    W_K[1, 1], W_Q[1, 1] = S, P          # L1H1: keys read S, queries read P (⊥ S, T)
    W_K[1, 0], W_Q[1, 0] = P, P          # L1H0: reads neither S nor T
    W_V[1, 1] = W_V[1, 0] = P
    planted = HeadWeights(W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, b_Q=None, b_K=None, b_V=None, b_O=None,
                          W_E=None, W_U=None, W_pos=None, family="test")
    K = composition_scores(planted, "K", dtype=torch.float64)
    Q = composition_scores(planted, "Q", dtype=torch.float64)
    V = composition_scores(planted, "V", dtype=torch.float64)
    assert K[0, 0, 1, 1] == pytest.approx(1 / math.sqrt(dh), abs=1e-12)   # the bound for rank d_head
    assert np.nanmax(np.delete(K[0, :, 1, :].ravel(), 1)) < 1e-12          # every other pair: 0
    assert np.nanmax(Q[0, :, 1, :]) < 1e-12 and np.nanmax(V[0, :, 1, :]) < 1e-12
    assert np.isnan(K[1]).all() and np.isnan(K[:, :, 0]).all()
    scalars = weight_circuit_scalars(planted, copying=False, previous_token=False)
    assert scalars["composition/K/L0H0->L1H1"] == pytest.approx(0.5, abs=1e-6)
    assert scalars["composition/K/max"] == pytest.approx(0.5, abs=1e-6)
    assert "composition/K/L1H0->L0H0" not in scalars


def test_ov_copying_identity_negation_and_dense_spectrum():
    d, vocab = 8, 12
    g = torch.Generator().manual_seed(0)
    W_E = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    hw = HeadWeights(W_Q=torch.zeros(1, 3, d, d, dtype=torch.float64), W_K=torch.zeros(1, 3, d, d, dtype=torch.float64),
                     W_V=torch.stack([eye, eye, eye])[None], W_O=torch.stack([eye, -eye, rot])[None],
                     b_Q=None, b_K=None, b_V=None, b_O=None, W_E=W_E, W_U=torch.linalg.pinv(W_E),
                     W_pos=None, family="test")
    copy = ov_copying_scores(hw)
    assert copy[0, 0] == pytest.approx(1.0, abs=1e-9)    # identity OV: every token copies itself
    assert copy[0, 1] == pytest.approx(-1.0, abs=1e-9)   # negated: every token suppresses itself
    # any head on random weights: the vocab × vocab spectrum gives the same score
    rw = _random_weights(2, 3, 10, 4, vocab=15, seed=3)
    ours = ov_copying_scores(rw)
    for layer in range(2):
        for h in range(3):
            full = (rw.W_E @ rw.W_V[layer, h] @ rw.W_O[layer, h] @ rw.W_U).numpy()
            lam = np.linalg.eigvals(full)
            assert ours[layer, h] == pytest.approx(lam.real.sum() / np.abs(lam).sum(), abs=1e-8)
    assert abs(copy[0, 2] - np.trace(rot.numpy()) / d) < 1e-9   # a rotation: |λ| = 1, Σλ = trace


def test_qk_previous_token_planted_and_rotary_is_nan():
    n_ctx, d, dh = 8, 16, 8
    W_pos = torch.eye(n_ctx, d, dtype=torch.float64)              # position i = e_i
    W_Q = torch.zeros(1, 2, d, dh, dtype=torch.float64)
    W_K = torch.zeros(1, 2, d, dh, dtype=torch.float64)
    for i in range(n_ctx):
        W_Q[0, 0, i, i] = 20.0                                    # q_i = 20 e_i
        if i + 1 < dh:
            W_K[0, 0, i, i + 1] = 1.0                             # k_j = e_{j+1}: q_i · k_{i-1} = 20
    hw = HeadWeights(W_Q=W_Q, W_K=W_K, W_V=W_Q.clone(), W_O=W_Q.transpose(-1, -2).clone(), b_Q=None,
                     b_K=None, b_V=None, b_O=None, W_E=None, W_U=None, W_pos=W_pos, family="test")
    score = qk_previous_token_scores(hw)
    assert score[0, 0] > 0.99                                     # the planted previous-token head
    uniform = np.mean([1 / (i + 1) for i in range(1, n_ctx)])    # zero QK: uniform causal attention
    assert score[0, 1] == pytest.approx(uniform, abs=1e-12)
    assert qk_previous_token_scores(hw, seq_len=4)[0, 1] == pytest.approx(np.mean([1 / 2, 1 / 3, 1 / 4]))
    with pytest.raises(InvalidInputError, match="seq_len"):
        qk_previous_token_scores(hw, seq_len=1)


@needs_hf
def test_rotary_models_have_no_positional_qk_circuit():
    neox = tiny_neox()
    assert head_weights(neox).W_pos is None
    assert np.isnan(qk_previous_token_scores(neox)).all()
    assert not any(k.startswith("qk_previous_token/") for k in weight_circuit_scalars(neox))


def test_baseline_is_what_random_initialisation_scores():
    model = AttentionOnlyTransformer(50, 3, 8, 64, 16, seed=0)   # Gaussian init, as the baseline
    for kind in "QKV":
        scores = composition_scores(model, kind)
        base = composition_baseline(model, kind, num_samples=256, seed=1)
        assert abs(np.nanmean(scores) - base) < 0.01, (kind, np.nanmean(scores), base)
    small, large = composition_baseline((64, 16)), composition_baseline((256, 16))
    assert 0.09 < small < 0.15 and large < small                   # REFERENCES.md: ~0.12 at 64 / 16
    assert composition_baseline((64, 16), seed=3) == composition_baseline((64, 16), seed=3)


@pytest.mark.parametrize("d,dh", [(40, 8), (96, 6)])
def test_baseline_sampled_in_d_head_dimensions_has_the_direct_distribution(d, dh):
    from devinterp.analyses.composition import _baseline_samples

    direct = _baseline_samples(d, dh, 3000, 11, reduced=False)
    reduced = _baseline_samples(d, dh, 3000, 12, reduced=True)
    se = np.sqrt(direct.var() / direct.size + reduced.var() / reduced.size)
    assert abs(direct.mean() - reduced.mean()) < 4 * se, (direct.mean(), reduced.mean(), se)
    assert abs(direct.std() - reduced.std()) < 0.1 * direct.std()
    qs = np.linspace(0.1, 0.9, 9)
    assert np.abs(np.quantile(direct, qs) - np.quantile(reduced, qs)).max() < 6 * se + 0.1 * direct.std()


# ----------------------------------------------------------------------------------------------
# the families
# ----------------------------------------------------------------------------------------------
def test_our_model_and_multihead_attention():
    ours = AttentionOnlyTransformer(20, 2, 3, 12, 10, seed=0)
    hw = head_weights(ours)
    assert hw.family == "devinterp" and hw.W_Q.shape == (2, 3, 12, 4) and hw.W_pos.shape == (10, 12)
    torch.testing.assert_close(hw.W_O[1, 2], ours.blocks[1].attn.W_O[2].detach())

    class MHAModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 12)
            self.layers = nn.ModuleList(nn.MultiheadAttention(12, 3, batch_first=True) for _ in range(2))
            self.unembed = nn.Linear(12, 20)

        def forward(self, tokens):
            x = self.embed(tokens)
            for att in self.layers:
                x = x + att(x, x, x, need_weights=False)[0]
            return self.unembed(x)

    torch.manual_seed(0)
    m = MHAModel()
    hw = head_weights(m)
    assert hw.family == "mha" and hw.W_U.shape == (12, 20) and hw.W_pos is None
    # the per-head weights reproduce the module's output
    x = torch.randn(1, 5, 12)
    att = m.layers[1]
    with torch.no_grad():
        want = att(x, x, x, need_weights=False)[0]
        z = []
        for h in range(3):
            q = x @ hw.W_Q[1, h] + hw.b_Q[1, h]
            k = x @ hw.W_K[1, h] + hw.b_K[1, h]
            v = x @ hw.W_V[1, h] + hw.b_V[1, h]
            z.append(torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v @ hw.W_O[1, h])
        got = sum(z) + hw.b_O[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert composition_scores(m, "V").shape == (2, 3, 2, 3)


def test_lightning_style_wrappers_and_errors():
    wrapper = nn.Module()
    wrapper.net = AttentionOnlyTransformer(20, 2, 2, 8, 6, seed=0)
    assert find_supported(wrapper) is wrapper.net
    assert find_supported(nn.Linear(2, 2)) is None
    with pytest.raises(InvalidInputError, match="cannot locate the attention heads"):
        head_weights(nn.Linear(2, 2))
    with pytest.raises(InvalidInputError, match="kind"):
        composition_scores(wrapper.net, "X")
    hw = _random_weights(2, 2, 8, 4, seed=0)
    with pytest.raises(InvalidInputError, match="unembedding"):
        ov_copying_scores(hw)


# ----------------------------------------------------------------------------------------------
# tracked over training: callback, post-hoc analysis, report
# ----------------------------------------------------------------------------------------------
def test_callback_and_posthoc_log_the_weight_circuits(tmp_path):
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from devinterp.callbacks._logging import metric_history
    from devinterp.callbacks.circuits import CircuitCallback
    from devinterp.data import InductionData
    from devinterp.posthoc.analyses import AnalysisContext, CircuitAnalysis
    from devinterp.schedules import every

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = AttentionOnlyTransformer(16, 2, 2, 16, 16, seed=0)

        def forward(self, tokens):
            return self.net(tokens)

        def training_step(self, batch, batch_idx):
            logits = self(batch[:, :-1])
            return F.cross_entropy(logits.reshape(-1, 16), batch[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    module = Lit()
    cb = CircuitCallback(16, every(3), seq_len=16, num_sequences=2, icl=False)  # the LightningModule itself
    trainer = pl.Trainer(max_steps=3, callbacks=[cb], logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(InductionData(16, 16, num_sequences=32, span_min=4, span_max=8), batch_size=8))
    history = metric_history(trainer)
    K = composition_scores(module.net, "K")
    assert [s for s, _ in history["composition/K/L0H1->L1H0"]] == [0, 3]
    assert history["composition/K/L0H1->L1H0"][-1][1] == pytest.approx(K[0, 1, 1, 0], abs=1e-6)
    assert {"composition/Q/max", "composition/V/L0H0->L1H1", "ov_copying/L1H1", "qk_previous_token/L0H0",
            "composition/K/baseline"} <= set(history)
    with pytest.raises(InvalidInputError, match="weights"):
        CircuitCallback(16, weights="yes")

    ctx = AnalysisContext(step=3, seed=0, step_seed=1, device=torch.device("cpu"))
    values = CircuitAnalysis(vocab_size=16, seq_len=16, num_sequences=2, icl=False).compute(module.net, None, ctx)
    assert values["composition/K/L0H1->L1H0"] == pytest.approx(K[0, 1, 1, 0], abs=1e-6)
    off = CircuitAnalysis(vocab_size=16, seq_len=16, num_sequences=2, icl=False, weights=False)
    assert not any(k.startswith("composition/") for k in off.compute(module.net, None, ctx))


def test_report_panel_and_circuit_naming():
    from devinterp.report import induction_circuits, strongest_pairs, summary_dict, summary_figure

    steps = np.arange(0, 400, 10)
    rise = 1 / (1 + np.exp(-(steps - 150) / 15))
    curves = {
        "induction/L1H0": (steps, 0.05 + 0.8 * rise), "induction/L1H1": (steps, 0.05 + 0.1 * rise),
        "previous_token/L0H0": (steps, 0.1 + 0.5 * rise), "previous_token/L0H1": (steps, 0.1 + 0 * rise),
        "composition/K/L0H0->L1H0": (steps, 0.12 + 0.2 * rise), "composition/K/L0H1->L1H0": (steps, 0.12 + 0 * rise),
        "composition/K/L0H0->L1H1": (steps, 0.12 + 0.01 * rise), "composition/K/L0H1->L1H1": (steps, 0.11 + 0 * rise),
        "composition/K/baseline": (steps, 0.12 + 0 * rise),
    }
    assert strongest_pairs(curves, "K", 2) == ["composition/K/L0H0->L1H0", "composition/K/L0H0->L1H1"]
    (c,) = induction_circuits(curves)
    assert (c["previous_token"], c["induction"], c["flagged"]) == ("L0H0", "L1H0", False)
    assert 140 <= c["step"] <= 160 and c["k_composition"][1] == pytest.approx(0.32, abs=1e-3)
    # formation ends at 1.5 x the step the induction score reaches half its final value (~150)
    end = c["formation_end"]
    assert 1.5 * 140 <= end <= 1.5 * 160
    i = np.searchsorted(steps, end, side="right") - 1
    assert c["rise_by_formation"] == pytest.approx(0.2 * (rise[i] - rise[0]))
    assert c["other_rises_by_formation"] == {"L0H1": pytest.approx(0.0)}

    class Flag:
        metric, step, start, end, direction, kind = "composition/K/L0H0->L1H0", 147.0, 130, 170, "rise", "sigmoid"

    (c,) = induction_circuits(curves, [Flag()])
    assert c["flagged"] and c["step"] == 147.0
    summary = summary_dict(curves, [Flag()])
    assert "L0H0 (previous token) → L1H0 (induction), K-composition 0.12 → 0.32 at step ~147" in summary["circuits"][0]["text"]
    fig = summary_figure(curves, [Flag()])
    assert any("K-composition" in ax.get_ylabel() for ax in fig.axes)
