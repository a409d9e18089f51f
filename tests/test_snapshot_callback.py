import copy
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _snapshot_models import TinyModule, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from devinterp.callbacks import SnapshotCallback
from devinterp.errors import InvalidInputError, ScheduleError
from devinterp.schedules import every, log_spaced
from devinterp.store import SnapshotStore


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("background", [True, False])
def test_trainer_run_records_schedule_and_meta(tmp_path, background):
    pl.seed_everything(0, verbose=False)
    model = TinyModule()
    initial = _state(model)
    cb = SnapshotCallback(schedule=log_spaced(6), background=background)
    trainer(tmp_path, 20, [cb]).fit(model, loader())  # 8 batches of 8 per epoch

    assert cb.resolved_dirpath == str(tmp_path / "snapshots")  # no logger: default_root_dir
    store = SnapshotStore(cb.resolved_dirpath)
    expected = [0] + log_spaced(6, stop=20).steps()
    assert store.steps() == expected and len(set(expected)) == len(expected) == 7
    for k, v in initial.items():
        assert torch.equal(store.load(0).state_dict[k], v)
    for k, v in _state(model).items():
        assert torch.equal(store.latest().state_dict[k], v)
    assert not torch.equal(store.load(0).state_dict["inp.weight"], store.latest().state_dict["inp.weight"])
    metas = [store.meta(s) for s in expected]
    assert [m["samples_seen"] for m in metas] == [8 * s for s in expected]
    assert [m["epoch"] for m in metas] == [max(0, (s - 1) // 8) for s in expected]
    assert metas[0]["train_loss"] is None
    assert all(m["train_loss"] > 0 and math.isfinite(m["train_loss"]) for m in metas[1:])
    walls = [m["wall_time"] for m in metas]
    assert walls == sorted(walls)
    run = store.run_info()
    assert run["model_class"] == "_snapshot_models:TinyModule"
    assert run["hparams"] == {"width": 8, "lr": 0.05, "tied": False}
    assert run["total_steps"] == 20 and run["planned_snapshots"] == len(expected)  # step 0 included
    assert store.verify().ok
    # rebuild from the run file alone
    fresh = TinyModule(**run["hparams"])
    store.load_into(fresh, 20)
    assert torch.equal(fresh.out.weight, model.out.weight)


def test_default_dirpath_follows_logger_and_loss_from_outputs(tmp_path):
    cb = SnapshotCallback(schedule=every(2))
    logger = CSVLogger(tmp_path, name="exp")
    trainer(tmp_path, 4, [cb], logger=logger).fit(TinyModule(), loader())
    assert cb.resolved_dirpath == str(Path(logger.log_dir) / "snapshots")
    store = SnapshotStore(cb.resolved_dirpath)
    assert store.steps() == [0, 2, 4]


def test_gradient_accumulation_snapshots_only_after_optimizer_steps(tmp_path):
    cb = SnapshotCallback(tmp_path / "s", schedule=every(1))
    trainer(tmp_path, 6, [cb], accumulate_grad_batches=2).fit(TinyModule(), loader())
    store = SnapshotStore(tmp_path / "s")
    assert store.steps() == list(range(7))
    assert [store.meta(s)["samples_seen"] for s in store.steps()] == [16 * s for s in range(7)]
    lines = (tmp_path / "s" / "index.jsonl").read_text().splitlines()
    assert len(lines) == 7  # each step written once


def test_bad_arguments():
    with pytest.raises(ScheduleError, match="Schedule"):
        SnapshotCallback(schedule=[1, 2, 3])
    with pytest.raises(InvalidInputError):
        SnapshotCallback(max_pending_bytes=0)


def test_unbounded_run_needs_a_bounded_schedule(tmp_path):
    class NoLength(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.randn(4),) for _ in range(16)])

    data = torch.utils.data.DataLoader(NoLength(), batch_size=8)
    cb = SnapshotCallback(tmp_path / "s", schedule=log_spaced(5))
    t = trainer(tmp_path, -1, [cb], max_epochs=-1, max_time="00:00:00:30")  # max_time: a safety net
    with pytest.raises(ScheduleError, match="max_steps"):
        t.fit(TinyModule(), data)


def test_resume_supersedes_interrupted_snapshots(tmp_path):
    # Full-batch training, so that Lightning's data order on resume cannot matter and the resumed
    # run must reproduce the uninterrupted one bit for bit.
    sched = every(3)
    full_batch = loader(batch_size=64)
    # A: the uninterrupted reference run.
    pl.seed_everything(0, verbose=False)
    ref = TinyModule()
    trainer(tmp_path / "a", 24, [SnapshotCallback(tmp_path / "a" / "s", schedule=sched)]).fit(ref, full_batch)
    a = SnapshotStore(tmp_path / "a" / "s")
    assert a.steps() == list(range(0, 25, 3))

    # B: the run that gets "interrupted"; default dirpath, checkpoints at every epoch end (= step).
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    cb_b = SnapshotCallback(schedule=sched)
    trainer(tmp_path / "b", 24, [cb_b, ckpt]).fit(TinyModule(), full_batch)
    b_dir = tmp_path / "b" / "snapshots"
    assert cb_b.resolved_dirpath == str(b_dir)
    # What the interrupted run left after step 8 differs from what a resumed run will produce.
    junk = SnapshotStore(b_dir, mode="a")
    for step in (9, 10, 12, 21):
        junk.save(step, {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}, {"junk": True})
    junk.close()  # one writer at a time: the resumed run takes the store over

    # C: resume from step 8 in another root dir: the store comes from the checkpoint's state.
    pl.seed_everything(123, verbose=False)
    cb_c = SnapshotCallback(schedule=sched)
    resumed = TinyModule()
    trainer(tmp_path / "c", 24, [cb_c]).fit(resumed, full_batch, ckpt_path=tmp_path / "ckpt" / "epoch=7-step=8.ckpt")
    assert cb_c.resolved_dirpath == str(b_dir)
    b = SnapshotStore(b_dir)
    assert b.steps() == a.steps()  # each scheduled step exactly once, 10 gone
    assert b.verify().ok
    for step in b.steps():
        snap = b.load(step)
        assert "junk" not in snap.meta
        assert snap.meta["samples_seen"] == a.meta(step)["samples_seen"] == 64 * step
        for k, v in a.load(step).state_dict.items():
            assert torch.equal(snap.state_dict[k], v), (step, k)
    records = [json.loads(x) for x in (b_dir / "index.jsonl").read_text().splitlines()]
    assert {"kind": "truncate", "after": 8} == {k: records[-7][k] for k in ("kind", "after")}


def test_callback_state_round_trip(tmp_path):
    cb = SnapshotCallback(tmp_path / "s", schedule=every(4))
    trainer(tmp_path, 4, [cb]).fit(TinyModule(), loader())
    state = copy.deepcopy(cb.state_dict())
    assert state["dirpath"] == str(tmp_path / "s") and state["samples_seen"] == 32
    other = SnapshotCallback()
    other.load_state_dict(state)
    assert other.state_dict()["samples_seen"] == 32


def test_resume_from_checkpoint_written_without_the_callback(tmp_path):
    full_batch = loader(batch_size=64)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path, 4, [ckpt]).fit(TinyModule(), full_batch)
    first = SnapshotCallback(tmp_path / "s1", schedule=every(2))
    second = SnapshotCallback(tmp_path / "s2", schedule=every(3))
    assert first.state_key != second.state_key
    trainer(tmp_path, 8, [first, second]).fit(TinyModule(), full_batch, ckpt_path=tmp_path / "ckpt" / "epoch=3-step=4.ckpt")
    s1, s2 = SnapshotStore(tmp_path / "s1"), SnapshotStore(tmp_path / "s2")
    assert s1.steps() == [4, 6, 8] and s2.steps() == [6]  # step S is saved when scheduled
    assert all(s1.meta(s)["samples_seen"] is None for s in s1.steps())  # unknown, not wrong
