"""The one scheduled-step gate of SnapshotCallback, CircuitCallback and LLCCallback: its resume semantics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from devinterp.callbacks import CircuitCallback, LLCCallback, SnapshotCallback
from devinterp.callbacks._gate import StepGate
from devinterp.errors import ScheduleError
from devinterp.schedules import every


def _snapshot(tmp_path):
    return SnapshotCallback(tmp_path / "s", every(5)), "_snapshot"


def _circuits(tmp_path):
    return CircuitCallback(16, every(5)), "_score"


def _llc(tmp_path):
    data = (torch.randn(8, 2),)
    return LLCCallback(data, lambda m, b: m(b[0]).pow(2).mean(), every(5), calibrate=False, step_size=1e-3), "_estimate"


FACTORIES = [_snapshot, _circuits, _llc]


def _trainer(tmp_path, step: int, max_steps: int = 20):
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_global_zero=False, log_dir=str(tmp_path),
                           default_root_dir=str(tmp_path), world_size=1, estimated_stepping_batches=max_steps)


def _instrument(cb, method: str) -> list[int]:
    acted: list[int] = []
    setattr(cb, method, lambda trainer, module, step, *a, **k: acted.append(step))
    return acted


def _train(cb, tmp_path, start: int, stop: int, accumulate: int = 2) -> None:
    """on_train_start at ``start``, then batch ends with ``accumulate`` batches per optimizer step."""
    trainer = _trainer(tmp_path, start)
    cb.on_train_start(trainer, None)
    for step in range(start + 1, stop + 1):
        trainer.global_step = step
        for _ in range(accumulate):
            cb.on_train_batch_end(trainer, None, None, None, 0)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__.strip("_"))
def test_resume_semantics_are_the_same_for_every_callback(factory, tmp_path):
    # a fresh run: step 0, then each due step once (gradient accumulation repeats steps)
    cb, method = factory(tmp_path)
    acted = _instrument(cb, method)
    _train(cb, tmp_path, 0, 12)
    assert acted == [0, 5, 10]
    state = cb.state_dict()
    assert state["last_step"] == 10

    # resumed from a checkpoint at step 10 that records step 10 as done: nothing twice
    again, _ = factory(tmp_path)
    again.load_state_dict(state)
    acted = _instrument(again, method)
    _train(again, tmp_path, 10, 20)
    assert acted == [15, 20]

    # the checkpoint at step 10 was written before the callback acted there: step 10 is not skipped
    late, _ = factory(tmp_path)
    late.load_state_dict({**state, "last_step": 5})
    acted = _instrument(late, method)
    _train(late, tmp_path, 10, 11)
    assert acted == [10]

    # resumed at a step that is not due: nothing at start, then the next due step; never step 0
    mid, _ = factory(tmp_path)
    mid.load_state_dict({**state, "last_step": 5})
    acted = _instrument(mid, method)
    _train(mid, tmp_path, 7, 10)
    assert acted == [10]

    # a checkpoint written without the callback (no state): a due resume step is done once
    bare, _ = factory(tmp_path)
    acted = _instrument(bare, method)
    _train(bare, tmp_path, 15, 16)
    assert acted == [15]


def test_gate_alone():
    gate = StepGate(every(4), owner="X", initial=False)
    with pytest.raises(ScheduleError, match="X: the schedule is resolved when training starts"):
        gate.is_due(4)
    trainer = SimpleNamespace(global_step=0, max_steps=8, estimated_stepping_batches=8)
    assert gate.start(trainer) is None  # initial=False: no step 0
    assert [s for s in range(1, 9) if gate.reached(s)] == [4, 8]
    assert gate.planned_steps() == [0, 4, 8]  # every(4) itself holds step 0
    with pytest.raises(ScheduleError, match="must be a devinterp.schedules.Schedule"):
        StepGate("every 5", owner="X")  # type: ignore[arg-type]


def test_circuit_options_are_checked_before_the_first_snapshot(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from devinterp.demo import InductionLM, SyntheticBatches
    from devinterp.errors import InvalidInputError
    from devinterp.models import induction_recipe

    recipe = induction_recipe()
    module = InductionLM(recipe, 0)
    loader = DataLoader(SyntheticBatches(recipe.build_data(0), 4, 1), batch_size=None)
    callbacks = [SnapshotCallback(tmp_path / "s", every(1)),  # first: it would write step 0 at train start
                 CircuitCallback(recipe.vocab_size, every(1), seq_len=2 * recipe.n_ctx, model_attr="model")]
    trainer = pl.Trainer(max_steps=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path))
    with pytest.raises(InvalidInputError, match=f"seq_len={2 * recipe.n_ctx} is longer than the model's context"):
        trainer.fit(module, loader)
    assert not (tmp_path / "s" / "index.jsonl").exists()  # no snapshot was written
