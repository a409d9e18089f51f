"""Weight-refined LLC of one attention head: head_params feeds estimate_llc's params=."""

import torch
import torch.nn.functional as F

from devinterp.analyses import estimate_llc
from devinterp.analyses.head_params import head_params
from devinterp.models import induction_recipe, train_induction_model


def _loss(model, batch):
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _estimate(model, tokens, params, seed=0):
    return estimate_llc(model, (tokens,), _loss, params=params, num_chains=2, num_draws=60,
                        num_burnin=30, step_size=1e-4, localization=100.0, batch_size=16, seed=seed)


def test_head_refined_llc_moves_only_that_head_and_is_smaller_than_the_whole():
    recipe = induction_recipe()
    model, _ = train_induction_model(recipe, seed=0, steps=150)   # near a minimum of its loss
    tokens = recipe.build_data(0).sample(128, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = head_params(model, 1, 0)
    selected = sum(int(m.sum()) for m in masks.values())
    assert 0 < selected < sum(p.numel() for p in model.parameters())

    head = _estimate(model, tokens, masks)
    whole = _estimate(model, tokens, None)
    assert head.config.num_params == selected
    assert 0 < head.mean < whole.mean           # fewer free weights, smaller coefficient
    other = _estimate(model, tokens, head_params(model, 1, 1))
    assert other.mean != head.mean               # a different head, a different estimate
    for k, v in model.state_dict().items():      # the model itself is untouched
        assert torch.equal(v, before[k])
