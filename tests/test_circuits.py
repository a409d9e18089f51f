import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from circuit_models import MHAInductionModel, sdpa_induction_model
from torch import nn

from devinterp.analyses.attention_capture import capture_attention, sdpa_pattern
from devinterp.analyses.circuits import HeadScores, icl_score, induction_scores
from devinterp.analyses.head_params import head_params, head_params_from_projections
from devinterp.errors import AttentionNotFoundError, DevinterpError, InvalidInputError
from devinterp.models import AttentionOnlyTransformer

V, T = 20, 32


# ---------------------------------------------------------------- ground truth: analytic circuit
@pytest.mark.parametrize("build", [sdpa_induction_model, MHAInductionModel], ids=["sdpa", "mha"])
@pytest.mark.parametrize("bos", [None, 0])
def test_analytic_circuit_is_found(build, bos):
    model = build(V, T)
    scores = induction_scores(model, vocab_size=V, seq_len=T, num_sequences=16, seed=1, bos_token=bos)
    assert scores.heads_per_layer == (2, 2)
    assert scores.previous_token[0, 0] >= 0.8
    assert scores.induction[1, 0] >= 0.8
    assert scores.copying[1, 0] >= 0.8
    others = [(0, 1), (1, 1)]
    for layer, head in others:
        assert scores.previous_token[layer, head] < 0.3
        assert scores.induction[layer, head] < 0.3
    assert scores.induction[0, 0] < 0.3 and scores.previous_token[1, 0] < 0.3
    assert np.all(np.abs(scores.copying[[0, 0, 1], [0, 1, 1]]) < 0.3)
    assert np.all(scores.duplicate_token < 0.3)
    assert scores.best("induction")[:2] == (1, 0)
    assert scores.best_previous_token_head()[:2] == (0, 0)


def test_sdpa_and_mha_capture_agree_with_manual_softmax():
    tokens = torch.randint(V, (3, T), generator=torch.Generator().manual_seed(0))
    a, b = sdpa_induction_model(V, T), MHAInductionModel(V, T)
    with capture_attention(a) as cap_a:
        out_a = a(tokens)
    with capture_attention(b) as cap_b:
        out_b = b(tokens)
    assert torch.allclose(out_a, out_b, atol=1e-4)
    # manual computation for the SDPA model
    x = a.embed(tokens) + a.pos_embed[:T]
    for layer, block in enumerate(a.blocks):
        q = torch.einsum("btd,hde->bhte", x, block.attn.W_Q)
        k = torch.einsum("btd,hde->bhte", x, block.attn.W_K)
        scores = q @ k.transpose(-1, -2) / math.sqrt(a.d_head)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        manual = torch.softmax(scores, -1)
        assert torch.allclose(cap_a.patterns[layer], manual, atol=1e-5)
        assert torch.allclose(cap_b.patterns[layer], manual, atol=1e-5)
        x = block(x)


def test_capture_does_not_change_outputs_and_mha_weights_match_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True, kdim=12, vdim=10).eval()
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 10)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    ref_out, ref_w = mha(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
    with capture_attention(mha) as cap:
        out, w = mha(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(w, ref_w, atol=1e-5)
    assert torch.allclose(cap.patterns[0], ref_w, atol=1e-5)
    assert cap.layers[0].kind == "multihead_attention" and cap.layers[0].num_heads == 4


def test_transformer_encoder_layer_fast_path_is_captured():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        ref = enc(x)
        with capture_attention(enc) as cap:
            out = enc(x)
    assert cap.num_layers == 2 and torch.allclose(out, ref, atol=1e-5)
    mha = enc.layers[0].self_attn
    _, w = mha(x, x, x, average_attn_weights=False)
    assert torch.allclose(cap.patterns[0], w, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


@pytest.mark.parametrize("case", ["gqa", "bool_mask", "float_mask", "scale", "three_d"])
def test_sdpa_variants(case):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 4, 6, 8, generator=g)
    v = torch.randn(2, 4, 6, 8, generator=g)
    kwargs = {}
    if case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(5, 6, generator=g) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 6, generator=g)
    elif case == "scale":
        kwargs["scale"] = 0.7
    elif case == "three_d":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]

    class M(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    model = M()
    with capture_attention(model, ablate=[(0, 1)] if q.dim() == 4 else []) as cap:
        out = model(q, k, v)
    pattern = cap.patterns[0]
    # manual reference
    kk = k.repeat_interleave(2, dim=1) if case == "gqa" else k
    vv = v.repeat_interleave(2, dim=1) if case == "gqa" else v
    s = q @ kk.transpose(-1, -2) * kwargs.get("scale", 1 / math.sqrt(8))
    if case == "bool_mask":
        s = s.masked_fill(~kwargs["attn_mask"], float("-inf"))
    if case == "float_mask":
        s = s + kwargs["attn_mask"]
    manual = torch.softmax(s, -1)
    expected_shape = (2, 1, 5, 6) if case == "three_d" else (2, 4, 5, 6)
    assert pattern.shape == expected_shape
    assert torch.allclose(pattern.reshape(manual.shape), manual, atol=1e-5)
    ref = manual @ vv
    if q.dim() == 4:
        assert torch.all(out[:, 1] == 0)
        ref[:, 1] = 0
    assert torch.allclose(out, ref, atol=1e-5)


def test_sdpa_pattern_causal_is_top_left_aligned():
    q, k = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4)
    p = sdpa_pattern(q, k, is_causal=True)
    assert torch.all(p[0, 0].triu(1) == 0) and torch.allclose(p.sum(-1), torch.ones(1, 1, 3))


def test_alias_import_is_intercepted():
    from torch.nn.functional import scaled_dot_product_attention as alias

    class M(nn.Module):
        def forward(self, x):
            return alias(x, x, x, is_causal=True)

    with capture_attention(M()) as cap:
        M()(torch.randn(1, 2, 4, 8))
    # a different instance: the pre-hook only resets on the captured model, but the mode is global
    assert cap.num_layers == 1


def test_everything_restored_after_exception():
    model = MHAInductionModel(V, T)
    mha = model.attn[0]

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with capture_attention(model):
            model(torch.zeros(1, 4, dtype=torch.long))
            raise Boom()
    assert "forward" not in mha.__dict__
    assert torch.backends.mha.get_fastpath_enabled()
    assert not model._forward_pre_hooks
    # no mode left behind: a plain SDPA call goes straight through
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()


def test_attention_not_found_on_mlp():
    mlp = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    with pytest.raises(AttentionNotFoundError, match="scaled_dot_product_attention"):
        induction_scores(mlp, vocab_size=10, seq_len=8, num_sequences=2)
    assert issubclass(AttentionNotFoundError, DevinterpError)


def test_bad_arguments():
    model = sdpa_induction_model(V, T)
    with pytest.raises(InvalidInputError):
        induction_scores(model, vocab_size=0)
    with pytest.raises(InvalidInputError):
        icl_score(model, torch.zeros(2, T, dtype=torch.long), early=10, late=5)
    with pytest.raises(InvalidInputError):
        icl_score(model)
    with capture_attention(model, ablate=[(0, 7)]), pytest.raises(InvalidInputError, match="heads"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_scores_are_deterministic_and_restore_train_mode():
    model = AttentionOnlyTransformer(16, 2, 2, 16, 24, seed=3).train()
    a = induction_scores(model, vocab_size=16, seq_len=24, num_sequences=4, seed=5)
    b = induction_scores(model, vocab_size=16, seq_len=24, num_sequences=4, seed=5, batch_size=3)
    assert model.training and all(m.training for m in model.modules())
    for kind in ("induction", "previous_token", "duplicate_token", "copying"):
        np.testing.assert_allclose(getattr(a, kind), getattr(b, kind), atol=1e-6)
    s = a.scalars()
    assert set(s) >= {"induction/L0H0", "previous_token/L1H1", "copying/L1H0", "induction/max"}
    assert a.labels == [["L0H0", "L0H1"], ["L1H0", "L1H1"]]
    no_copy = induction_scores(model, vocab_size=16, seq_len=24, num_sequences=4, copying=False)
    assert np.all(np.isnan(no_copy.copying)) and not any(k.startswith("copying") for k in no_copy.scalars())
    assert isinstance(a, HeadScores)


@pytest.mark.parametrize("build", [sdpa_induction_model, MHAInductionModel], ids=["sdpa", "mha"])
def test_icl_score_sign(build):
    induction = build(V, T)
    # on repeated tokens the induction model predicts the second half: late loss << early loss
    assert icl_score(induction, vocab_size=V, seq_len=T, num_sequences=8) < -1.0
    # a model without the induction head (L1H0 ablated) has no such gain
    with capture_attention(induction, ablate=[(1, 0)], record=False):
        ablated = icl_score(induction, vocab_size=V, seq_len=T, num_sequences=8)
    assert abs(ablated) < 0.1
    # explicit tokens
    tokens = torch.randint(V, (4, T), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(icl_score(induction, tokens, early=2, late=20))


def test_head_params_for_our_model_and_mha():
    model = AttentionOnlyTransformer(16, 2, 4, 32, 8)
    masks = head_params(model, 1, 2)
    assert set(masks) == {f"blocks.1.attn.{n}" for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")}
    assert masks["blocks.1.attn.W_Q"][2].all() and masks["blocks.1.attn.W_Q"].sum() == 32 * 8
    mha_model = MHAInductionModel(V, T)
    m = head_params(mha_model, 1, 1)
    E = mha_model.attn[1].embed_dim
    dh = E // 2
    w = m["attn.1.in_proj_weight"]
    assert w.sum() == 3 * dh * E and w[dh:2 * dh].all() and not w[:dh].any()
    assert m["attn.1.out_proj.weight"][:, dh:].all() and not m["attn.1.out_proj.weight"][:, :dh].any()
    for mdl, masks_ in ((model, masks), (mha_model, m)):
        params = dict(mdl.named_parameters())
        assert all(name in params and params[name].shape == mask.shape for name, mask in masks_.items())
    with pytest.raises(InvalidInputError, match="head_params_from_projections"):
        head_params(nn.Linear(2, 2), 0, 0)
    with pytest.raises(InvalidInputError):
        head_params(model, 2, 0)


def test_head_params_from_projections_gqa():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8),
                                              nn.Linear(16, 16))

    m = head_params_from_projections(Attn(), q="q", k="k", v="v", o="o", head=3, num_heads=4,
                                     num_kv_heads=2)
    assert m["q.weight"][12:].all() and m["q.weight"].sum() == 4 * 16
    assert m["k.weight"][4:].all() and not m["k.weight"][:4].any()  # kv head 1
    assert m["o.weight"][:, 12:].all() and m["o.weight"].sum() == 16 * 4
    with pytest.raises(InvalidInputError):
        head_params_from_projections(Attn(), q="q", k="nope", v="v", o="o", head=0, num_heads=4)


def test_capture_with_gradients_and_ablation_backpropagates():
    model = AttentionOnlyTransformer(16, 2, 2, 16, 12, seed=0)
    tokens = torch.randint(16, (2, 12), generator=torch.Generator().manual_seed(0))
    with capture_attention(model, ablate=[(0, 1)]) as cap:
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
    assert cap.num_layers == 2 and cap.patterns[0].shape == (2, 2, 12, 12)
    # the ablated head gets no gradient through its output projection
    assert torch.all(model.blocks[0].attn.W_O.grad[1] == 0)
    assert model.blocks[0].attn.W_O.grad[0].abs().sum() > 0
