"""Tiny deterministic Lightning set-up shared by the snapshot tests and their subprocess scripts.

Run as a script (``python tests/_snapshot_models.py --root R --max-steps N ...``) it trains with a
``SnapshotCallback`` and a ``ModelCheckpoint``, resuming from ``R/ckpt/last.ckpt`` when asked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class TinyModule(pl.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.05, tied: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.inp = nn.Linear(4, width)
        self.out = nn.Linear(width, 4, bias=False)
        if tied:
            self.dec = nn.Linear(4, width, bias=False)
            self.dec.weight = self.inp.weight  # a real tie: one Parameter under two names

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = (self(x) - x.flip(-1)).pow(2).mean()
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def make_data(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g))


def loader(batch_size: int = 8, n: int = 64) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(make_data(n), batch_size=batch_size, shuffle=False)


def trainer(root: Path | str, max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    opts = dict(
        max_steps=max_steps,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        log_every_n_steps=1,
    )
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def _main() -> None:
    sys.path.insert(0, str(REPO))
    from lightning.pytorch.callbacks import ModelCheckpoint

    from devinterp.callbacks import SnapshotCallback
    from devinterp.schedules import every

    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=8)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step (slow run)")
    p.add_argument("--ddp", type=int, default=0, help="number of CPU processes for DDP (gloo)")
    args = p.parse_args()

    pl.seed_everything(0, verbose=False)
    root = Path(args.root)
    ckpt_dir = root / "ckpt"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if args.resume and last.exists() else None

    class Sleepy(pl.Callback):
        def on_train_batch_end(self, *a, **k):
            if args.sleep:
                time.sleep(args.sleep)

    callbacks = [
        SnapshotCallback(root / "store", schedule=every(args.every)),
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=args.ckpt_every, save_last=True, save_top_k=-1),
        Sleepy(),
    ]
    extra = {}
    if args.ddp:
        extra = dict(strategy="ddp", devices=args.ddp, deterministic=False)
    t = trainer(root, args.max_steps, callbacks, **extra)
    t.fit(TinyModule(), loader(), ckpt_path=ckpt_path)
    if t.is_global_zero:
        torch.save({k: v.clone() for k, v in t.lightning_module.state_dict().items()}, root / "final.pt")
        print("DONE", t.global_step, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _main()
