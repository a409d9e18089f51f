"""Lean-path LLC (>= 2^20 parameters) on CPU: one worker with every core as intra-op threads
against one chain per worker with one intra-op thread each (``workers="auto"``, the default).

Usage: python benchmarks/llc_lean_workers.py [--workloads tf2m,tf10m] [--repeats 2] [--busy]

Each run is a fresh process (so neither setting inherits the other's thread pools or heap):
``estimate_llc`` on the ``tf2m`` / ``tf10m`` attention-only transformers of
``benchmarks/llc_throughput.py`` (2.1M / 10.0M parameters), 4 chains x 8 draws, no burn-in, the
workload's fixed step size, batch 8 x 64 tokens, seed 0. ``--busy`` starts one busy-looping
process for the duration, as another job on a shared machine would. Prints wall and CPU seconds
per run and the wall-time ratio one-worker / auto (below 1: one worker is faster); lambda-hat
must be the same for both (the chains do not depend on the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(mode: str, workload: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from llc_throughput import WORKLOADS, build

    from devinterp.analyses import estimate_llc

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, x, y, per_sample = build(workload, seed=0)
    cfg = WORKLOADS[workload]

    def loss_fn(m, b):
        return per_sample(m, *b).mean()

    t0, c0 = time.perf_counter(), time.process_time()
    r = estimate_llc(model, (x, y), loss_fn, num_chains=4, num_draws=8, num_burnin=0,
                     step_size=cfg["step_size"], localization=cfg["localization"], batch_size=8,
                     seed=0, workers=1 if mode == "one" else "auto", progress=False)
    print(json.dumps(dict(wall=time.perf_counter() - t0, cpu=time.process_time() - c0,
                          llc=r.mean)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="tf2m,tf10m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="one competing busy-looping process")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    busy = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None)
    try:
        for wl in args.workloads.split(","):
            print(f"{wl}: 4 chains x 8 draws, {args.repeats} interleaved rounds"
                  f"{' with one busy process' if busy else ''} ...", file=sys.stderr, flush=True)
            walls: dict[str, list[float]] = {"one": [], "auto": []}
            for _ in range(args.repeats):
                for mode in ("one", "auto"):
                    out = subprocess.run([sys.executable, __file__, "--worker", mode, wl],
                                         capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    walls[mode].append(r["wall"])
                    label = "workers=1, all cores intra-op" if mode == "one" else 'workers="auto"'
                    print(f"  {wl:6s} {label:30s} wall {r['wall']:6.1f} s  cpu {r['cpu']:6.1f} s"
                          f"  llc {r['llc']:.4f}", flush=True)
            ratios = [a / b for a, b in zip(walls["one"], walls["auto"], strict=True)]
            print(f"  {wl}: wall one-worker / auto = {min(ratios):.2f}..{max(ratios):.2f}",
                  flush=True)
    finally:
        if busy is not None:
            busy.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
