"""Wall-time overhead of SnapshotCallback on a small Lightning run.

A ~1M-parameter MLP trains for ``--steps`` optimizer steps on synthetic data (CPU), with and
without ``SnapshotCallback(schedule=log_spaced(--snapshots))``. Runs are interleaved (with,
without, with, ...) and repeated, so that machine load drifts affect both arms alike; the printed
ratio is median(with) / median(without) of the ``trainer.fit`` wall time. Target: <= 1.03.
It also prints the time spent inside the callback's hooks on the training thread (copying the
weights, queueing them, and waiting for the last writes at the end), as a share of the fit time:
a view of the overhead that does not depend on how busy the machine was between runs.

    OMP_NUM_THREADS=1 python benchmarks/snapshot_overhead.py                 # 5000 steps, 3 repeats
    OMP_NUM_THREADS=1 python benchmarks/snapshot_overhead.py --steps 500 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from devinterp.callbacks import SnapshotCallback  # noqa: E402
from devinterp.schedules import log_spaced  # noqa: E402
from devinterp.store import SnapshotStore  # noqa: E402


class MLP(pl.LightningModule):
    def __init__(self, d_in: int = 128, hidden: tuple[int, int] = (1024, 768), lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        h1, h2 = hidden
        self.net = nn.Sequential(nn.Linear(d_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, d_in))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.net(x) - x.roll(1, dims=-1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TimedSnapshotCallback(SnapshotCallback):
    """SnapshotCallback that adds up the time its hooks take on the training thread."""

    hook_seconds = 0.0

    def _timed(self, hook, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            self.hook_seconds += time.perf_counter() - t0

    def on_train_start(self, *args, **kwargs):
        return self._timed(super().on_train_start, *args, **kwargs)

    def on_train_batch_end(self, *args, **kwargs):
        return self._timed(super().on_train_batch_end, *args, **kwargs)

    def on_train_end(self, *args, **kwargs):  # includes waiting for the last background writes
        return self._timed(super().on_train_end, *args, **kwargs)


def run_once(steps: int, snapshots: int, with_callback: bool, background: bool, workdir: Path,
             batch: int) -> tuple[float, int, float]:
    pl.seed_everything(0, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(batch * 64, 128))
    dl = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
    model = MLP()
    callbacks = []
    if with_callback:
        callbacks.append(TimedSnapshotCallback(workdir / "snapshots", schedule=log_spaced(snapshots),
                                               background=background))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=workdir,
    )
    t0 = time.perf_counter()
    trainer.fit(model, dl)
    elapsed = time.perf_counter() - t0
    n = len(SnapshotStore(workdir / "snapshots")) if with_callback else 0
    hooks = callbacks[0].hook_seconds if with_callback else 0.0
    return elapsed, n, hooks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--snapshots", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sync", action="store_true", help="write snapshots on the training thread (background=False)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    params = sum(p.numel() for p in MLP().parameters())
    print(f"model: {params:,} parameters; {args.steps} steps; log_spaced({args.snapshots}) snapshots; "
          f"{'sync' if args.sync else 'background'} writes; {args.repeats} interleaved repeats")
    with_t, without_t, hook_t = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            for flag in order:
                workdir = Path(tmp) / f"r{r}-{int(flag)}"
                t, n, hooks = run_once(args.steps, args.snapshots, flag, not args.sync, workdir, args.batch)
                (with_t if flag else without_t).append(t)
                if flag:
                    hook_t.append(hooks / t)
                label = f"with    ({n} snapshots)" if flag else "without"
                extra = f"  (callback hooks on the training thread: {hooks:.2f} s)" if flag else ""
                print(f"  repeat {r}: {label:24s} {t:8.2f} s{extra}", flush=True)
    ratios = [w / wo for w, wo in zip(with_t, without_t, strict=True)]
    ratio = statistics.median(with_t) / statistics.median(without_t)
    print(f"per-repeat ratios: {', '.join(f'{x:.3f}' for x in ratios)}")
    print(f"wall-time ratio with/without (medians): {ratio:.3f}  (target <= 1.03)")
    print(f"callback hooks' share of the with-callback fit time: "
          f"{', '.join(f'{100 * x:.2f}%' for x in hook_t)} (load-independent view of the same overhead)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
