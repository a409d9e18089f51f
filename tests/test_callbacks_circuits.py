import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from devinterp.callbacks._logging import metric_history
from devinterp.callbacks.circuits import CircuitCallback
from devinterp.data import InductionData
from devinterp.errors import InvalidInputError
from devinterp.models import AttentionOnlyTransformer
from devinterp.schedules import at, every


class LitLM(pl.LightningModule):
    def __init__(self, vocab=16, n_ctx=16):
        super().__init__()
        self.net = AttentionOnlyTransformer(vocab, 2, 2, 16, n_ctx, seed=0)
        self.modes_seen = []

    def forward(self, tokens):
        return self.net(tokens)

    def training_step(self, batch, batch_idx):
        self.modes_seen.append(self.training)
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _trainer(tmp_path, cb, steps=6):
    return pl.Trainer(max_steps=steps, callbacks=[cb], logger=pl.loggers.CSVLogger(tmp_path),
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)


def test_callback_logs_scores_at_scheduled_steps(tmp_path):
    data = InductionData(16, 16, num_sequences=64, span_min=4, span_max=8)
    module = LitLM()
    cb = CircuitCallback(16, at([3]) | every(5), seq_len=16, num_sequences=4, copying=True,
                         model_attr="net")
    trainer = _trainer(tmp_path, cb)
    trainer.fit(module, DataLoader(data, batch_size=8))
    history = metric_history(trainer)
    assert [s for s, _ in history["induction/L1H1"]] == [0, 3, 5]
    assert {"previous_token/L0H0", "copying/L0H1", "icl_score", "induction/max"} <= set(history)
    assert all(module.modes_seen)  # the scoring put the model back in train mode
    assert cb.state_dict() == {"last_step": 5}


def test_callback_default_schedule_resolves_from_max_steps(tmp_path):
    data = InductionData(16, 16, num_sequences=64, span_min=4, span_max=8)
    module = LitLM()
    cb = CircuitCallback(16, seq_len=16, num_sequences=2, icl=False)
    trainer = _trainer(tmp_path, cb, steps=4)
    trainer.fit(module, DataLoader(data, batch_size=8))
    steps = [s for s, _ in metric_history(trainer)["induction/L0H0"]]
    assert steps == [0, 1, 2, 3, 4] and "icl_score" not in metric_history(trainer)


def test_callback_validates_arguments():
    with pytest.raises(InvalidInputError):
        CircuitCallback(0)
    with pytest.raises(InvalidInputError):
        CircuitCallback(16, schedule=[1, 2])
    with pytest.raises(InvalidInputError):
        CircuitCallback(16, icl_tokens=torch.zeros(3))


def test_resumed_run_does_not_score_step_zero_again(tmp_path):
    data = InductionData(16, 16, num_sequences=64, span_min=4, span_max=8)
    loader = DataLoader(data, batch_size=8)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                        save_top_k=-1)
    first = CircuitCallback(16, every(2), seq_len=16, num_sequences=2, icl=False)
    trainer = pl.Trainer(max_steps=3, callbacks=[first, ckpt], logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(LitLM(), loader)
    assert [s for s, _ in metric_history(trainer)["induction/L0H0"]] == [0, 2]

    resumed = CircuitCallback(16, every(2), seq_len=16, num_sequences=2, icl=False)
    trainer = pl.Trainer(max_steps=6, callbacks=[resumed], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(LitLM(), loader, ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    assert [s for s, _ in metric_history(trainer)["induction/L0H0"]] == [4, 6]
