"""``head_params`` on the families researchers bring (issue 12): HF GPT-2, GPT-NeoX, Llama (GQA), TL.

Two checks per family: the masks select exactly one head (perturbing the selected entries changes
that head's attention pattern and no other head's — with grouped-query attention, the heads of its
key/value group), and the per-head weight-refined LLC is finite, differs by head and leaves the
weights untouched.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from client_models import needs_hf, needs_tl, tiny_gpt2, tiny_llama, tiny_neox, tl_bridge
from torch.utils.data import TensorDataset

from devinterp.analyses import estimate_llc
from devinterp.analyses.head_params import head_params

FAMILIES = [(tiny_gpt2, {1}), (tiny_neox, {1}), (tiny_llama, {0, 1})]  # heads whose pattern moves for head 1


def _patterns(model, tokens):
    with torch.no_grad():
        return torch.stack(model(tokens, output_attentions=True).attentions)  # (layers, B, H, T, T)


@needs_hf
@pytest.mark.parametrize("build,moved", FAMILIES)
def test_masks_select_exactly_one_head(build, moved):
    model = build(attn="eager", seed=1)
    tokens = torch.randint(0, 24, (3, 12), generator=torch.Generator().manual_seed(0))
    before = _patterns(model, tokens)
    masks = head_params(model, 1, 1)
    named = dict(model.named_parameters())
    assert masks and set(masks) <= set(named)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, m in masks.items():
            named[name].add_(torch.randn(named[name].shape, generator=g) * m)
    after = _patterns(model, tokens)
    changed = {h for h in range(4) if (after[1, :, h] - before[1, :, h]).abs().max() > 1e-4}
    assert changed == moved, (build.__name__, changed)
    torch.testing.assert_close(after[0], before[0])        # layer 0 untouched


def _loss(model, batch):
    (tokens,) = batch
    logits = model(input_ids=tokens).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _per_head_llcs(model, tokens):
    data = TensorDataset(tokens)
    out = []
    for head in (0, 1):
        res = estimate_llc(model, data, _loss, params=head_params(model, 1, head), num_chains=1,
                           num_draws=20, num_burnin=10, step_size=1e-4, localization=100.0,
                           batch_size=16, seed=0, vectorize=False)
        out.append(res.mean)
    return out


@needs_hf
@pytest.mark.filterwarnings("ignore:w\\* does not look like a local minimum")
@pytest.mark.parametrize("build", [b for b, _ in FAMILIES])
def test_per_head_llc_is_finite_differs_by_head_and_leaves_weights(build):
    model = build(seed=0)
    tokens = torch.randint(0, 24, (64, 16), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llcs = _per_head_llcs(model, tokens)
    assert all(math.isfinite(v) for v in llcs) and llcs[0] != llcs[1], llcs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@needs_tl
@pytest.mark.filterwarnings("ignore:w\\* does not look like a local minimum")
def test_per_head_llc_on_a_transformer_bridge(tmp_path):
    bridge = tl_bridge(tiny_gpt2(seed=0), tmp_path)
    masks = head_params(bridge, 1, 2)
    assert sum(int(m.sum()) for m in masks.values()) == 4 * 32 * 8 + 3 * 8   # q,k,v,o of one head + biases
    tokens = torch.randint(0, 24, (64, 16), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in bridge.state_dict().items()}

    def loss(model, batch):
        (t,) = batch
        logits = model(t)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))

    res = estimate_llc(bridge, TensorDataset(tokens), loss, params=masks, num_chains=1, num_draws=20,
                       num_burnin=10, step_size=1e-4, localization=100.0, batch_size=16, seed=0,
                       vectorize=False)
    assert math.isfinite(res.mean)
    for k, v in bridge.state_dict().items():
        assert torch.equal(v, before[k]), k
