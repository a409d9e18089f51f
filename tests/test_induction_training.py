"""Ground truth by training: the reference model grows an induction head on the recipe's data."""

import pytest
import torch

from devinterp.analyses.circuits import icl_score, induction_scores
from devinterp.data import InductionData, repeated_tokens
from devinterp.errors import InvalidInputError
from devinterp.models import AttentionOnlyTransformer, induction_recipe, train_induction_model


def _check_run(seed: int) -> None:
    recipe = induction_recipe()
    model, log = train_induction_model(recipe, seed=seed, eval_every=25, score_sequences=16, stop_at=0.7)
    assert log.max_induction[0] < 0.2
    assert log.crossing(0.6) is not None, f"no induction head within {recipe.steps} steps: {log.max_induction}"
    # a genuine induction head, not a head attending at the training offset: score on a probe with
    # a BOS token and another repeat length
    probe = induction_scores(model, vocab_size=recipe.vocab_size, seq_len=recipe.n_ctx - 5,
                             num_sequences=16, seed=11, bos_token=0)
    layer, _, score = probe.best("induction")
    assert layer == 1 and score > 0.5
    assert probe.best("previous_token")[0] == 0
    assert icl_score(model, vocab_size=recipe.vocab_size, seq_len=recipe.n_ctx) < -0.5


def test_reference_model_forms_an_induction_head():
    _check_run(seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reference_model_forms_an_induction_head_other_seeds(seed):
    _check_run(seed=seed)


def test_data_is_deterministic_and_shaped():
    a = InductionData(32, 24, seed=3, layout="periodic", span_min=4, span_max=8)
    b = InductionData(32, 24, seed=3, layout="periodic", span_min=4, span_max=8)
    assert torch.equal(a[5], b[5]) and a[5].shape == (24,)
    assert not torch.equal(a[5], a[6])
    batch = a.sample(16, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (16, 24) and batch.max() < 32
    # periodic: every sequence repeats with some period in [4, 8]
    for row in batch:
        assert any(torch.equal(row[k:], row[:-k]) for k in range(4, 9))
    span = InductionData(32, 24, seed=3, span_min=6, span_max=8).sample(8, generator=torch.Generator().manual_seed(0))
    for row in span:  # a copied span of >= 6 tokens exists
        found = any(torch.equal(row[i:i + 6], row[j:j + 6])
                    for i in range(19) for j in range(i + 6, 19))
        assert found
    with pytest.raises(InvalidInputError):
        InductionData(32, 8, span_min=6)
    with pytest.raises(InvalidInputError):
        InductionData(32, 24, layout="zigzag")


def test_repeated_tokens():
    t = repeated_tokens(50, 21, 4, seed=1, bos_token=7)
    assert t.shape == (4, 21) and torch.all(t[:, 0] == 7) and not torch.any(t[:, 1:] == 7)
    assert torch.equal(t[:, 1:11], t[:, 11:21])
    assert all(len(set(row[1:11].tolist())) == 10 for row in t)
    assert torch.equal(t, repeated_tokens(50, 21, 4, seed=1, bos_token=7))
    with pytest.raises(InvalidInputError):
        repeated_tokens(50, 3, 4)


def test_model_shapes_and_validation():
    m = AttentionOnlyTransformer(11, 2, 3, 12, 9, seed=0)
    assert m(torch.zeros(2, 9, dtype=torch.long)).shape == (2, 9, 11)
    assert m.blocks[1].attn.W_Q.shape == (3, 12, 4) and m.blocks[0].attn.W_O.shape == (3, 4, 12)
    same = AttentionOnlyTransformer(11, 2, 3, 12, 9, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), same.parameters(), strict=True))
    with pytest.raises(InvalidInputError):
        m(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(InvalidInputError):
        AttentionOnlyTransformer(11, 0)


def test_skip_markov_language_follows_the_last_token_or_the_one_before():
    from devinterp.data import SkipMarkovLanguage

    gen = torch.Generator().manual_seed(0)
    for skip in (0.0, 1.0, 0.5):
        lang = SkipMarkovLanguage(16, branching=2, skip=skip, seed=4)
        x = lang.sample(64, 20, generator=gen)
        assert x.shape == (64, 20) and x.max() < 16
        by_last = lang.last.transition[x[:, 1:-1], x[:, 2:]] > 0
        by_before = lang.before.transition[x[:, :-2], x[:, 2:]] > 0
        assert torch.all(by_last | by_before)
        if skip == 0.0:
            assert torch.all(by_last)
        elif skip == 1.0:
            assert torch.all(by_before)
        else:  # both tables are used, and the token before the last carries information
            assert (~by_last).any() and (~by_before).any()
    again = SkipMarkovLanguage(16, branching=2, skip=0.5, seed=4)
    assert torch.equal(again.before.transition, lang.before.transition)
    with pytest.raises(InvalidInputError):
        SkipMarkovLanguage(16, skip=1.5)
