"""Post-hoc throughput: snapshots per second with 2 processes against 1 (CPU, gloo).

Writes a snapshot store of a small MLP (``--snapshots`` snapshots), then runs
``devinterp analyze STORE --llc --force --devices D`` for D = 1 and 2, interleaved ``--repeats``
times, and prints the compute-phase throughput (snapshots / second of the analysis loop, as the
command reports it) and the end-to-end wall time (process start-up and Fabric launch included),
with the 2-vs-1 ratios, next to the machine's parallel ceiling at that moment (two independent
CPU-bound processes against one: ~2.0x on an idle 2-core machine). Every run uses ``OMP_NUM_THREADS=1`` per process, so the 2-process run
uses the second core and the 1-process run does not.

If the LLC estimator is not installed, a CPU-bound stand-in analysis (matrix products, about the
same cost) is used instead; the output says which.

    python benchmarks/posthoc_throughput.py [--snapshots 16] [--repeats 3] [--draws 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_model(width: int = 64) -> nn.Module:
    """The benchmark's network: a 2-hidden-layer MLP on 16 inputs."""
    return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def make_data(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


@dataclass(frozen=True)
class BusyAnalysis:
    """Stand-in when the LLC estimator is missing: ``repeats`` forward/backward passes."""

    repeats: int = 400
    name: str = "busy"

    def config(self):
        return {"repeats": self.repeats}

    def compute(self, model, snapshot, context):
        x, y = make_data(512)
        total = 0.0
        for _ in range(self.repeats):
            model.zero_grad()
            loss = mse(model, (x, y))
            loss.backward()
            total += float(loss)
        return {"busy/mean_loss": total / self.repeats}


def write_store(root: Path, snapshots: int) -> Path:
    from devinterp.store import SnapshotStore

    store = SnapshotStore(root, mode="a")
    model = make_model()
    x, y = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0
    for i in range(snapshots):
        store.save(step, model.state_dict(), {"train_loss": float(mse(model, (x, y)).detach())})
        for _ in range(4 * (i + 1)):
            opt.zero_grad()
            mse(model, (x, y)).backward()
            opt.step()
            step += 1
    store.write_run(model_class=None, hparams={})
    return root


def run_once(store: Path, devices: int, args: argparse.Namespace, use_llc: bool) -> tuple[float, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "devinterp", "analyze", str(store), "--force", "--no-progress",
           "--no-tensorboard", "--devices", str(devices), "--model", f"{THIS}:make_model"]
    if use_llc:
        cmd += ["--llc", "--data", f"{THIS}:make_data", "--loss", f"{THIS}:mse", "--llc-chains", "4",
                "--llc-draws", str(args.draws), "--llc-burnin", str(args.draws // 4),
                "--llc-step-size", "1e-4", "--llc-batch-size", "256"]
    else:
        cmd += ["--analysis", f"{THIS}:BusyAnalysis"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"analyze failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = re.search(r"(\d+) computed.*?([\d.]+)s on (\d+) process", proc.stdout)
    if not m or int(m.group(1)) != args.snapshots:
        raise SystemExit(f"unexpected output:\n{proc.stdout}\n{proc.stderr[-2000:]}")
    return args.snapshots / float(m.group(2)), wall


_BURN = ("import time, torch; torch.set_num_threads(1); a = torch.randn(200, 200); t = time.perf_counter()\n"
         "for _ in range(3000): a = torch.tanh(a @ a * 0.01)\n")


def parallel_ceiling() -> float:
    """What 2 processes can gain right now: 2 x (time of one CPU-bound job alone) / (time of two at once).

    About 2.0 on an idle 2-core machine; lower while other jobs use the cores. The post-hoc ratio
    cannot beat it.
    """
    cmd = [sys.executable, "-c", _BURN]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env) for _ in range(2)]
    for p in procs:
        p.wait()
    both = time.perf_counter() - t0
    return 2 * alone / both


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshots", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draws", type=int, default=300, help="LLC draws per chain (4 chains)")
    args = p.parse_args()
    use_llc = importlib.util.find_spec("devinterp.analyses.llc") is not None
    what = (f"LLC (4 chains x {args.draws} draws, batch 256, MLP 16-64-64-1, n=2048)" if use_llc
            else "BusyAnalysis (LLC missing)")
    print(f"cpus={os.cpu_count()} snapshots={args.snapshots} analysis={what}")
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "store", args.snapshots)
        rows = []
        ceilings = []
        for r in range(args.repeats):
            ceilings.append(parallel_ceiling())
            one = run_once(store, 1, args, use_llc)
            two = run_once(store, 2, args, use_llc)
            rows.append((one, two))
            print(f"repeat {r}: 1 proc {one[0]:.2f} snap/s (wall {one[1]:.1f}s) | 2 procs {two[0]:.2f} snap/s "
                  f"(wall {two[1]:.1f}s) | ratio compute {two[0] / one[0]:.2f}x, end-to-end {one[1] / two[1]:.2f}x "
                  f"| machine ceiling now {ceilings[-1]:.2f}x", flush=True)
    ratios = [b[0] / a[0] for a, b in rows]
    walls = [a[1] / b[1] for a, b in rows]
    print(f"throughput ratio 2 vs 1 process (compute loop): median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}); end-to-end: median {statistics.median(walls):.2f}x "
          f"(range {min(walls):.2f}-{max(walls):.2f}); machine ceiling (2 independent CPU-bound processes): "
          f"median {statistics.median(ceilings):.2f}x (range {min(ceilings):.2f}-{max(ceilings):.2f})")


if __name__ == "__main__":
    main()
