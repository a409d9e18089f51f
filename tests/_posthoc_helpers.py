"""Stand-in analyses and factories for the post-hoc tests (importable by subprocesses too)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from devinterp.errors import ChainDivergedError

_TESTS = Path(__file__).resolve().parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's ``devinterp`` subprocess: this checkout and tests/ importable,
    one intra-op thread, no warnings; ``extra`` on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_TESTS.parent), str(_TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


@dataclass(frozen=True)
class WeightNorm:
    """A cheap deterministic 'analysis': the weight norm, plus a seeded random draw.

    ``sleep`` slows it down (for interruption tests); ``fail_at`` makes one step diverge;
    ``log_to`` appends ``step`` to a file each time a snapshot is computed (to count recomputes).
    """

    scale: float = 1.0
    sleep: float = 0.0
    fail_at: int | None = None
    log_to: str | None = None
    name: str = "norm"

    def config(self):
        return {"scale": self.scale, "fail_at": self.fail_at}

    def compute(self, model, snapshot, context):
        if self.sleep:
            time.sleep(self.sleep)
        if self.log_to:
            with open(self.log_to, "a") as f:
                f.write(f"{context.step} {os.getpid()}\n")
                f.flush()
        if self.fail_at is not None and context.step == self.fail_at:
            raise ChainDivergedError("diverged on purpose", chain=0, step=3)
        total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()) ** 0.5
        g = torch.Generator().manual_seed(context.step_seed % (2**63))
        return {"norm/total": self.scale * total, "norm/draw": float(torch.rand((), generator=g)),
                "norm/step_echo": float(snapshot.step)}


def slow_norm():
    """Factory for ``--analysis`` in subprocess tests (sleep and log file from the environment)."""
    return WeightNorm(sleep=float(os.environ.get("POSTHOC_SLEEP", "0")), log_to=os.environ.get("POSTHOC_LOG"))


def tiny_data():
    from _snapshot_models import make_data

    return make_data()


def empty_data():
    return torch.utils.data.TensorDataset(torch.zeros(0, 4))


def return_none():
    return None


def mse_loss(model, batch):
    (x,) = batch
    return (model(x) - x.flip(-1)).pow(2).mean()


class WrongModel(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = torch.nn.Linear(4, width + 1)
        self.out = torch.nn.Linear(width + 1, 4, bias=False)


def make_run(root, max_steps: int = 24, every_n: int = 3, ckpt_every: int = 8):
    """Train TinyModule with a SnapshotCallback store (``root/store``) and ModelCheckpoint (``root/ckpt``)."""
    import lightning.pytorch as pl
    from _snapshot_models import TinyModule, loader, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from devinterp.callbacks import SnapshotCallback
    from devinterp.schedules import every

    pl.seed_everything(0, verbose=False)
    cbs = [SnapshotCallback(root / "store", schedule=every(every_n), background=False),
           ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1)]
    trainer(root, max_steps, cbs).fit(TinyModule(), loader())
    return root


@dataclass(frozen=True)
class BadInputAt:
    """An analysis that hits a usage error (an InvalidInputError) at one step: fatal for the whole run."""

    step: int = 9
    name: str = "bad_input"

    def config(self):
        return {"step": self.step}

    def compute(self, model, snapshot, context):
        from devinterp.errors import InvalidInputError

        if context.step == self.step:
            raise InvalidInputError(f"option does not fit the model at step {context.step}")
        return {"bad_input/ok": 1.0}


def bad_input_at_9():
    return BadInputAt(step=int(os.environ.get("POSTHOC_BAD_STEP", "9")))
