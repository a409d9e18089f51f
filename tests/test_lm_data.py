"""``estimate_llc`` / ``calibrate`` on data held the way LM users hold it, with ``lm_loss``."""

from __future__ import annotations

import math

import pytest
import torch
from client_models import VOCAB, needs_hf, tiny_gpt2
from torch import nn
from torch.utils.data import DataLoader, Dataset

from devinterp.analyses import estimate_llc, lm_loss
from devinterp.analyses.sampling import prepare_target
from devinterp.data import repeated_tokens
from devinterp.errors import InvalidInputError

FAST = dict(num_chains=2, num_draws=8, num_burnin=4, step_size=1e-4, seed=0, vectorize=False)


class Recorder(nn.Module):
    """Logits from an embedding; remembers the type of every batch its loss sees."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.emb(input_ids)


def seen_batches(data, **kwargs) -> list:
    seen = []

    def loss(model, batch):
        seen.append(batch)
        return lm_loss(model, batch)

    prepare_target(Recorder(), data, loss, **kwargs)  # computes L(w*) on the batches
    return seen


class Rows(Dataset):
    def __init__(self, tokens, with_labels=False):
        self.tokens, self.with_labels = tokens, with_labels

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        row = {"input_ids": self.tokens[i], "attention_mask": torch.ones_like(self.tokens[i])}
        if self.with_labels:
            row["labels"] = self.tokens[i]
        return row


TOKENS = repeated_tokens(VOCAB, 16, 40, seed=3)


def test_batch_has_the_structure_the_dataloader_yields():
    # a bare tensor is a dataset of its rows: batches are tensors, as DataLoader(tensor) gives
    for data in (TOKENS, DataLoader(TOKENS, batch_size=8)):
        batch = seen_batches(data, batch_size=8)[0]
        assert isinstance(batch, torch.Tensor) and batch.shape[1:] == (16,)
        assert type(next(iter(DataLoader(TOKENS, batch_size=8)))) is type(batch)
    batch = seen_batches(Rows(TOKENS), batch_size=8)[0]
    assert isinstance(batch, dict) and set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape[1:] == (16,)
    rows = [{"input_ids": t} for t in TOKENS]  # a plain list of samples
    assert set(seen_batches(rows, batch_size=8)[0]) == {"input_ids"}
    assert isinstance(seen_batches((TOKENS,), batch_size=8)[0], tuple)
    assert isinstance(seen_batches({"input_ids": TOKENS}, batch_size=8)[0], dict)


@needs_hf
def test_batch_encoding_stays_a_batch_encoding():
    from transformers import BatchEncoding

    enc = BatchEncoding({"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)})
    batch = seen_batches(enc, batch_size=8)[0]
    assert isinstance(batch, BatchEncoding) and batch["input_ids"].shape == (8, 16)


def test_lm_loss_forms_agree():
    model = Recorder()
    ref = nn.functional.cross_entropy(model(TOKENS)[:, :-1].reshape(-1, VOCAB), TOKENS[:, 1:].reshape(-1))
    for batch in (TOKENS, (TOKENS,), {"input_ids": TOKENS},
                  {"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)},
                  {"input_ids": TOKENS, "labels": TOKENS},
                  (TOKENS[:, :-1], TOKENS[:, 1:])):
        torch.testing.assert_close(lm_loss(model, batch), ref)
    # padded positions (attention_mask 0) and label -100 are left out
    mask = torch.ones_like(TOKENS)
    mask[:, -4:] = 0
    short = nn.functional.cross_entropy(model(TOKENS)[:, :-5].reshape(-1, VOCAB), TOKENS[:, 1:-4].reshape(-1))
    torch.testing.assert_close(lm_loss(model, {"input_ids": TOKENS, "attention_mask": mask}), short)
    with pytest.raises(InvalidInputError, match="input_ids"):
        lm_loss(model, {"x": TOKENS})
    with pytest.raises(InvalidInputError, match="integer"):
        lm_loss(model, TOKENS.float())


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    return tiny_gpt2(n_ctx=16).eval()


@needs_hf
def test_estimate_llc_on_hf_gpt2_with_lm_data(gpt2):
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    results = {
        "tensor": estimate_llc(gpt2, TOKENS, batch_size=8, **FAST),
        "loader": estimate_llc(gpt2, DataLoader(TOKENS, batch_size=8), **FAST),
        "dicts": estimate_llc(gpt2, Rows(TOKENS), batch_size=8, **FAST),
        "labels": estimate_llc(gpt2, Rows(TOKENS, with_labels=True), batch_size=8, **FAST),
    }
    for name, r in results.items():
        assert math.isfinite(r.mean), name
    # the same data in every form: the same initial loss (next-token CE, HF's own .loss with labels)
    init = [r.init_loss for r in results.values()]
    assert max(init) - min(init) < 1e-4, init
    assert abs(init[0] - math.log(VOCAB)) < 0.5  # an untrained model
    # a tensor and a DataLoader over it are the same data with the same batches: the same chains
    assert results["tensor"].mean == pytest.approx(results["loader"].mean, rel=1e-5)
    for k, v in gpt2.state_dict().items():
        torch.testing.assert_close(v, before[k])
