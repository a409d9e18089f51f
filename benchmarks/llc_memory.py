"""Extra memory of an LLC estimate on a ~10M-parameter transformer, in units of the parameters.

Target: at most (chains + 2) × the parameters (the chains, w*, one gradient) on top of what the
model, the data and one training step (forward and backward) already take.

Each configuration runs in a fresh process. A monitor thread samples the proportional set size
(PSS, from ``/proc/<pid>/smaps_rollup``) of the process and of its children every 20 ms, so
memory shared between a parent and its forked chain workers is counted once. Two baselines:

- ``after build``: the model (float32) and the data exist, nothing has run;
- ``after a step``: additionally one forward + backward pass has run and its gradients were
  freed (the allocator keeps what a step needs: activations, one gradient).

``extra`` is the peak during ``estimate_llc`` minus a baseline, divided by 4 bytes × parameters.
Configurations: ``lean-sequential``, the default path for this size (lean: chains one after the
other, in place), the same with the chains on 2 threads and on 2 processes, and
``batched-sequential``, the path smaller models take (``LEAN_MIN_DIM`` raised above the model's
size), for comparison.

    OMP_NUM_THREADS=1 python benchmarks/llc_memory.py [--chains 4] [--draws 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = {
    "lean-sequential": dict(workers=1, lean=True),
    "lean-2-threads": dict(workers=2, backend="thread", lean=True),
    "lean-2-processes": dict(workers=2, backend="process", lean=True),
    "batched-sequential": dict(workers=1, lean=False),
}


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def total_pss() -> int:
    me = os.getpid()
    return pss_bytes(me) + sum(pss_bytes(c) for c in children(me))


class Monitor:
    def __init__(self, every: float = 0.02):
        self.every, self.peak, self.stop = every, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, total_pss())
            time.sleep(self.every)

    def __enter__(self) -> Monitor:
        self.peak = total_pss()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, total_pss())


def worker(name: str, chains: int, draws: int, batch: int) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    from llc_throughput import WORKLOADS, build

    from devinterp.analyses import estimate_llc, sampling

    torch.set_num_threads(1)
    cfg = CONFIGS[name]
    if not cfg["lean"]:
        sampling.LEAN_MIN_DIM = 1 << 40
    model, x, y, per_sample = build("tf10m", seed=0)
    x, y = x[:64], y[:64]  # 64 sequences: L(w*) costs 64 / batch forward passes
    params = sum(p.numel() for p in model.parameters())

    def loss_fn(m, b):
        return per_sample(m, b[0], b[1]).mean()

    time.sleep(0.2)
    after_build = total_pss()
    loss_fn(model, (x[:batch], y[:batch])).backward()  # one training step's forward/backward
    model.zero_grad(set_to_none=True)
    after_step = total_pss()
    kwargs = {"workers": cfg["workers"]}
    if cfg.get("backend") == "thread":
        from devinterp.analyses import parallel

        parallel.fork_available = lambda: False  # the plan then picks threads
    t0 = time.perf_counter()
    with Monitor() as mon:
        r = estimate_llc(model, (x, y), loss_fn, num_chains=chains, num_draws=draws,
                         num_burnin=0, step_size=WORKLOADS["tf10m"]["step_size"],
                         localization=100.0, batch_size=batch, num_acceptance_checks=1,
                         **kwargs)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps(dict(params=params, after_build=after_build,
                                      after_step=after_step, peak=mon.peak, seconds=seconds,
                                      llc=r.mean)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2, help="sequences of 64 tokens per minibatch")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.chains, args.draws, args.batch)
        return 0
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.chains} chains "
          f"× {args.draws} draws, batch {args.batch} × 64 tokens; target extra ≤ chains + 2 = "
          f"{args.chains + 2} × parameters")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in args.configs.split(","):
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--chains",
                               str(args.chains), "--draws", str(args.draws), "--batch",
                               str(args.batch)], env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        out = json.loads(line[0][len("RESULT "):])
        unit = 4 * out["params"]
        print(f"{name:20s} parameters {out['params']:,} ({unit / 2**20:.1f} MiB); "
              f"peak {out['peak'] / 2**20:7.1f} MiB; extra after build "
              f"{(out['peak'] - out['after_build']) / unit:5.2f}×, after a step "
              f"{(out['peak'] - out['after_step']) / unit:5.2f}× the parameters "
              f"({out['seconds']:.1f} s, λ̂ {out['llc']:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
