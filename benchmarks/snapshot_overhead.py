"""Overhead of SnapshotCallback on a small Lightning run: wall time and CPU time.

A ~1M-parameter MLP trains for ``--steps`` optimizer steps on synthetic data (CPU), with and
without ``SnapshotCallback(schedule=log_spaced(--snapshots))``. Every run is a **fresh process**
(the arms alternate, the order flips every repeat) and the training is bit-identical in both
arms (checked: same final weights). Printed per pair and as medians:

- the ``trainer.fit`` wall-time ratio with/without (target <= 1.03);
- the CPU-time ratio (user + system time of the whole process, writer thread included);
- the time inside the callback's hooks on the training thread, as a share of the fit time;
- where the callback's CPU goes, measured directly with ``time.thread_time`` in the thread that
  does it: copying the state dict (training thread), serialising, sha256, the atomic file write
  (write + fsync + rename + directory fsync) and the index line (writer thread), and a
  "direct" CPU ratio: 1 + (hooks' CPU on the training thread + the writer thread's CPU) / the
  CPU of the fit without the callback.

The two ratios compare separate runs and carry the machine's noise: on the shared 2-core
machine (load ~10) the CPU time of one and the same fit varied by ±30% between processes (a
1500-step pair gave a CPU ratio of 0.73, the "with" run the cheaper). CPU time under load is
inflated by contention (shared caches, the other jobs' memory traffic), so a ratio of 1.105 there
says nothing about the callback; the direct breakdown does (docs/snapshots.md).

Why fresh processes: earlier versions ran both arms in one process and reported the callback
runs 14–38% *faster* (ratios 0.63–0.86). That was not the callback: the two arms compute the
same weights, there are no denormals in the optimizer state, and on the loaded 2-core machine a
150-step fit took 23–31 s of wall time for 3–4 s of CPU — the wall time measured scheduling (how
many other jobs shared the cores during that run) and the state left by the previous fit in the
same process (allocator, caches, lazily initialised Lightning machinery), not the callback. One
process per run and a CPU-time ratio remove both.

    OMP_NUM_THREADS=1 python benchmarks/snapshot_overhead.py                 # 5000 steps, 3 repeats
    OMP_NUM_THREADS=1 python benchmarks/snapshot_overhead.py --steps 500 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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
    hook_cpu = 0.0  # CPU time of the training thread inside the hooks (waits excluded)
    end_seconds = 0.0  # of hook_seconds: on_train_end (waiting for the last writes)

    def _timed(self, hook, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return hook(*args, **kwargs)
        finally:
            self.hook_seconds += time.perf_counter() - t0
            self.hook_cpu += time.thread_time() - c0

    def on_train_start(self, *args, **kwargs):
        return self._timed(super().on_train_start, *args, **kwargs)

    def on_train_batch_end(self, *args, **kwargs):
        return self._timed(super().on_train_batch_end, *args, **kwargs)

    def on_train_end(self, *args, **kwargs):  # includes waiting for the last background writes
        t0 = time.perf_counter()
        try:
            return self._timed(super().on_train_end, *args, **kwargs)
        finally:
            self.end_seconds += time.perf_counter() - t0


def run_once(steps: int, snapshots: int, with_callback: bool, background: bool, workdir: Path,
             batch: int) -> tuple[float, int, tuple[float, float, float]]:
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
    hooks = ((callbacks[0].hook_seconds, callbacks[0].hook_cpu, callbacks[0].end_seconds)
             if with_callback else (0.0, 0.0, 0.0))
    return elapsed, n, hooks


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


#: CPU seconds (``time.thread_time``: of the thread that ran them) per part of the snapshot
#: work, filled by :func:`instrument` in the with-callback runs
PARTS: dict[str, float] = {}


def instrument() -> None:
    """Add up the thread CPU time of each part of writing a snapshot, wherever it runs: the
    copy of the state dict (training thread), serialisation, sha256, the atomic file write
    (write + fsync + rename + directory fsync) and the index line (write + fsync), and the
    whole ``SnapshotStore.save`` (the writer thread with background writes)."""
    from devinterp import store
    from devinterp.callbacks import snapshot

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                PARTS[label] = PARTS.get(label, 0.0) + time.thread_time() - t0

        setattr(owner, name, wrapper)

    timed(snapshot, "detached_copy", "copy")
    timed(store, "_to_safetensors_bytes", "serialise")
    timed(store, "_sha256", "sha256")
    timed(store._LocalFS, "write_atomic", "file")
    timed(store.SnapshotStore, "_append", "index")
    timed(store.SnapshotStore, "save", "save")


def worker(flag: bool, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if flag:
        instrument()
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, main0 = cpu_seconds(), time.thread_time()
        t, n, hooks = run_once(args.steps, args.snapshots, flag, not args.sync, Path(tmp),
                               args.batch)
        cpu, main = cpu_seconds() - cpu0, time.thread_time() - main0
    print("RESULT " + json.dumps({"wall": t, "cpu": cpu, "main_cpu": main, "snapshots": n,
                                  "hooks": hooks[0], "hooks_cpu": hooks[1], "end_wait": hooks[2],
                                  "parts": PARTS}))


def spawn(flag: bool, argv: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--worker", "with" if flag else "without",
                           *argv], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--snapshots", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sync", action="store_true", help="write snapshots on the training thread (background=False)")
    p.add_argument("--worker", choices=["with", "without"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker == "with", args)
        return 0
    passthrough = ["--steps", str(args.steps), "--snapshots", str(args.snapshots), "--batch",
                   str(args.batch)] + (["--sync"] if args.sync else [])
    params = sum(p.numel() for p in MLP().parameters())
    print(f"model: {params:,} parameters; {args.steps} steps; log_spaced({args.snapshots}) snapshots; "
          f"{'sync' if args.sync else 'background'} writes; {args.repeats} repeats, one fresh process per run")
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.repeats):
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        for flag in ((True, False) if r % 2 == 0 else (False, True)):
            out = spawn(flag, passthrough)
            runs[flag].append(out)
            label = f"with    ({out['snapshots']} snapshots)" if flag else "without"
            extra = (f"  hooks {out['hooks']:.2f} s ({out['hooks_cpu']:.2f} cpu-s; "
                     f"{out['end_wait']:.2f} s of it at the end, waiting for the writer)"
                     if flag else "")
            extra += f"  training-thread cpu {out['main_cpu']:.2f} s"
            if flag:
                extra += "  (" + ", ".join(f"{k} {v:.2f}" for k, v in out["parts"].items()) + " cpu-s)"
            print(f"  repeat {r} (load {load}): {label:24s} wall {out['wall']:8.2f} s  "
                  f"cpu {out['cpu']:8.2f} s{extra}", flush=True)
    w, wo = runs[True], runs[False]
    for key in ("wall", "cpu"):
        ratios = [a[key] / b[key] for a, b in zip(w, wo, strict=True)]
        med = statistics.median(a[key] for a in w) / statistics.median(b[key] for b in wo)
        print(f"{key:4s} ratio with/without: medians {med:.3f}; per repeat "
              f"{', '.join(f'{x:.3f}' for x in ratios)}  (target <= 1.03)")
    shares = ", ".join(f"{100 * a['hooks'] / a['wall']:.2f}%" for a in w)
    print(f"callback hooks' share of the with-callback fit time: {shares}")
    # The ratios above compare two runs, each exposed to the machine's load (on the shared
    # 2-core machine the CPU time of one and the same fit varies by ±30% between processes).
    # The callback's own work is measured directly: CPU time of the training thread inside
    # its hooks plus CPU time of the writer thread in SnapshotStore.save (background writes;
    # with --sync that is inside the hooks already).
    base = statistics.median(b["cpu"] for b in wo)
    direct = [a["hooks_cpu"] + (0.0 if args.sync else a["parts"].get("save", 0.0)) for a in w]
    print(f"direct: the callback's work = {statistics.median(direct):.2f} cpu-s (hooks on the "
          f"training thread {statistics.median(a['hooks_cpu'] for a in w):.2f}, writer thread "
          f"{0.0 if args.sync else statistics.median(a['parts'].get('save', 0.0) for a in w):.2f}"
          f") against {base:.2f} cpu-s for the fit without it: CPU ratio "
          f"{1 + statistics.median(direct) / base:.3f} (target <= 1.03)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
