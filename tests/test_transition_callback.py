import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from scipy.special import expit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from devinterp.callbacks import TransitionCallback
from devinterp.errors import InvalidInputError
from devinterp.schedules import log_spaced

MID = 120  # planted transition midpoint (step)


class Planted(pl.LightningModule):
    """A tiny regression whose logged metric 'planted' rises by 10 noise sd around step MID."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.noise = np.random.default_rng(0).normal(0, 0.05, 10_000)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.lin(x) - y) ** 2).mean()
        s = self.global_step
        value = 0.5 * expit((math.log(s + 1) - math.log(MID)) / 0.08) + self.noise[s]
        self.log("planted", float(value), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _trainer(tmp_path, cb, max_steps):
    return pl.Trainer(max_steps=max_steps, logger=TensorBoardLogger(tmp_path, name="tb"),
                      callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)


def test_flags_planted_transition_once_and_writes_tensorboard(tmp_path):
    cb = TransitionCallback(["planted"], sample_schedule=log_spaced(150, stop=800), check_every=20)
    trainer = _trainer(tmp_path, cb, 800)
    trainer.fit(Planted(), _loader())
    assert len(cb.transitions) == 1  # checked ~40 times, flagged once
    t = cb.transitions[0]
    assert t.metric == "planted" and t.direction == "rise"
    assert 1 / 1.5 <= t.step / MID <= 1.5
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    flags = acc.Scalars("transitions/flag")
    assert [(e.step, e.value) for e in flags] == [(int(round(t.step)), 1.0)]
    # the marker: written once, in step order, flat at the curve's first value with a spike
    # across its range at the flag
    marker = [(e.step, e.value) for e in acc.Scalars("transitions/marker/planted")]
    assert [s for s, _ in marker] == sorted(s for s, _ in marker)
    tops = [s for s, v in marker if v != marker[0][1]]
    assert tops == [int(round(t.step)) + k for k in (-1, 0, 1)]
    assert dict(marker)[tops[1]] > marker[0][1] + 0.3  # the rise is 0.5
    texts = [k for k in acc.Tags()["tensors"] if k.startswith("transitions")]
    assert texts, acc.Tags()
    text = acc.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert "planted" in text and "rise" in text


def test_state_dict_roundtrip_prevents_reflagging(tmp_path):
    cb = TransitionCallback(["planted"], sample_schedule=log_spaced(150, stop=800), check_every=20)
    _trainer(tmp_path, cb, 800).fit(Planted(), _loader())
    state = cb.state_dict()
    cb2 = TransitionCallback(["planted"], sample_schedule=log_spaced(150, stop=800), check_every=20)
    cb2.load_state_dict(state)
    assert cb2.transitions == cb.transitions
    trainer = _trainer(tmp_path / "again", cb2, 800)
    trainer.fit(Planted(), _loader())
    assert cb2.transitions == cb.transitions  # the same transition is not flagged again


def test_reads_curves_published_by_other_callbacks(tmp_path):
    from devinterp.callbacks import _logging

    noise = np.random.default_rng(1).normal(0, 0.1, 1000)

    class Publisher(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = trainer.global_step
            if s in set(log_spaced(100, stop=600).steps()):
                v = 3.0 * expit((math.log(s + 1) - math.log(60)) / 0.1) + noise[s]
                _logging.log_scalars(trainer, {"llc/mean": v}, step=s)

    cb = TransitionCallback(["llc/mean"], check_every=25)
    trainer = pl.Trainer(max_steps=600, logger=False, callbacks=[Publisher(), cb],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Planted(), _loader())
    assert len(cb.transitions) == 1 and abs(math.log(cb.transitions[0].step / 60)) < math.log(1.5)
    assert "llc/mean" not in cb._sampled


def test_constructor_validates():
    with pytest.raises(InvalidInputError):
        TransitionCallback([])
    with pytest.raises(InvalidInputError):
        TransitionCallback("loss")
    with pytest.raises(InvalidInputError):
        TransitionCallback(["loss"], check_every=0)
    with pytest.raises(InvalidInputError):
        TransitionCallback(["loss"], detector_kwargs={"metric": "x"})
