"""CircuitCallback and LLCCallback on a LightningModule wrapping a HuggingFace model."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from client_models import VOCAB, needs_hf, tiny_gpt2
from torch.utils.data import DataLoader

from devinterp.callbacks import CircuitCallback, LLCCallback
from devinterp.callbacks._logging import metric_history
from devinterp.data import repeated_tokens
from devinterp.schedules import at

pytestmark = needs_hf


class HFLit(pl.LightningModule):
    """The usual wrapper: forward returns the HF ``ModelOutput``; the loss is HF's own."""

    def __init__(self, attn: str):
        super().__init__()
        self.model = tiny_gpt2(attn=attn, n_ctx=16)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_callbacks_on_a_lightning_module_wrapping_hf(tmp_path, attn):
    tokens = repeated_tokens(VOCAB, 16, 32, seed=1)
    circuits = CircuitCallback(VOCAB, at([0, 2]), seq_len=16, num_sequences=4, copying=True)
    llc = LLCCallback(tokens[:16], schedule=at([2]), calibrate=False, num_chains=1, num_draws=6,
                      num_burnin=2, step_size=1e-4, batch_size=8)  # lm_loss by default
    trainer = pl.Trainer(max_steps=2, callbacks=[circuits, llc], logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(HFLit(attn), DataLoader(tokens, batch_size=8))
    history = metric_history(trainer)
    assert [s for s, _ in history["induction/L1H3"]] == [0, 2]
    assert {"previous_token/L0H0", "copying/L1H0", "icl_score"} <= set(history)
    assert [s for s, _ in llc.results] == [0, 2]  # step 0 is always estimated
    for _, result in llc.results:
        assert math.isfinite(result.mean) and abs(result.init_loss - math.log(VOCAB)) < 0.5


class HFLitDict(pl.LightningModule):
    """The other usual wrapper: dict batches (``input_ids``, ``attention_mask``, ``labels``) and
    ``forward(**batch)`` returning the HF ``ModelOutput`` with its own ``.loss``."""

    def __init__(self):
        super().__init__()
        self.model = tiny_gpt2(n_ctx=16, seed=2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_callbacks_on_dict_batches_and_model_output_loss(tmp_path):
    tokens = repeated_tokens(VOCAB, 16, 32, seed=4)
    rows = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t} for t in tokens]
    circuits = CircuitCallback(VOCAB, at([1]), seq_len=16, num_sequences=4)
    llc = LLCCallback(rows[:16], schedule=at([1]), calibrate=False, num_chains=1, num_draws=6,
                      num_burnin=2, step_size=1e-4, batch_size=8)  # lm_loss takes HF's .loss
    module = HFLitDict()
    trainer = pl.Trainer(max_steps=2, callbacks=[circuits, llc], logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, DataLoader(rows, batch_size=8))
    history = metric_history(trainer)
    assert [s for s, _ in history["induction/L1H0"]] == [0, 1]  # step 0 is always scored
    assert [s for s, _ in llc.results] == [0, 1]
    for _, result in llc.results:
        assert math.isfinite(result.mean) and abs(result.init_loss - math.log(VOCAB)) < 0.5
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())  # it trained
