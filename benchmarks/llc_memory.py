"""Extra memory of an LLC estimate on a ~10M-parameter transformer, in units of the parameters.

Goal (issue 13): at most (chains + 2) × the parameters of extra memory.

What "extra" means here: the peak memory of the process (and of its chain worker processes,
if any) while ``estimate_llc`` runs, minus the memory after the model (float32) and the data
were built and nothing else had run ("after build"), divided by 4 bytes × the number of
parameters. Everything the estimate allocates counts: the chains' parameters, w*, gradients,
MALA check buffers, per-chain model copies, activations and autograd state of the chains'
forward/backward passes, noise, worker threads/processes and allocator slack. A second,
looser figure ("after a step") subtracts the memory after one forward + backward pass of the
model had also run and its gradients were freed (the allocator keeps some of what a step
needs); the goal is checked against the strict "after build" figure.

Memory is the proportional set size (PSS, from ``/proc/<pid>/smaps_rollup``) of the process's
anonymous and shared memory (``Pss_Anon + Pss_Shmem``: the heap and ``share_memory_`` buffers)
plus that of its children, sampled every 20 ms by a monitor thread: memory shared between a
parent and its forked chain workers (the model, the data, the chains' shared buffer) is counted
once. File-backed pages (the code of libtorch and the other libraries) are left out: they are
not the estimate's data, and their PSS changes whenever other processes that map the same
libraries start or stop (±10 MB on the shared machine, ~0.3× the parameters here).
Each lean configuration's extra is printed as the chain states (one per worker: the lean path
runs each worker's chains one after the other, each from w*, in one reused chain state, so the
number of chains does not enter) + the MALA check buffer (1×, the benchmark asks for one check;
a check runs alone) + the rest: the working memory of the workers' forward/backward passes
(activations, gradients in flight, autograd state, model copies) and what the allocator keeps, with
glibc's heap (``mallinfo2``: in use / free) at the peak for the in-process configurations, and
the run's CPU time (system part) and minor page faults. glibc tunables in the environment
(``MALLOC_MMAP_THRESHOLD_=131072`` fixes the mmap threshold: blocks of 128 KiB and more are
mapped and returned when freed) are passed to the configurations and printed.

Each configuration runs in a fresh process: ``lean-sequential`` (``workers=1``: the lean path
this size takes, chains one after the other, each parameter tensor moved in place as its
gradient lands), the same with the chains on 2 threads and on 2 processes (``workers=2``: each
worker adds its own chain state, activations and temporaries), ``lean-auto`` (``workers="auto"``
with every core: what ``estimate_llc`` does by default, chains on ``min(chains, cores)`` threads),
``lean-2-threads-shared-arena`` (2 threads sharing one malloc arena, the opt-in
``parallel.SHARE_HEAP = True``, against glibc's default of one arena per thread) and ``batched-sequential``, the path
smaller models take (``LEAN_MIN_DIM`` raised above the model's size), for comparison (not
bound by the goal: below 2^20 parameters its (C, D) temporaries are small).

    OMP_NUM_THREADS=1 python benchmarks/llc_memory.py [--chains 4] [--draws 30]

Prints one line per configuration and a verdict against the goal for every lean configuration
(the exit status is 1 when one misses it); ``--chains 8`` shows that the lean figures do not grow
with the chains.
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
    "lean-auto": dict(workers="auto", lean=True),
    "lean-sequential": dict(workers=1, lean=True),
    "lean-2-threads": dict(workers=2, backend="thread", lean=True),
    "lean-2-processes": dict(workers=2, backend="process", lean=True),
    # the threads share one malloc arena (``parallel.SHARE_HEAP = True``, opt-in): against
    # lean-2-threads, glibc's default of one arena per thread
    "lean-2-threads-shared-arena": dict(workers=2, backend="thread", lean=True, share_heap=True),
    "batched-sequential": dict(workers=1, lean=False),
}


def pss_bytes(pid: int) -> int:
    """Anonymous + shared-memory PSS of ``pid`` (bytes): what it allocated, without the
    pages of shared libraries (their PSS moves as other processes start and stop)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def total_pss() -> int:
    me = os.getpid()
    return pss_bytes(me) + sum(pss_bytes(c) for c in children(me))


def heap() -> tuple[int, int] | None:
    """glibc's heap of this process (all threads' arenas): ``(bytes in use, bytes free)`` from
    ``mallinfo2``, or None where unavailable. Free bytes are resident unless ``malloc_trim``
    returned their pages; blocks above the mmap threshold are mapped on their own and counted
    in neither."""
    try:
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = Info
        info = fn()
        return int(info.uordblks), int(info.fordblks)
    except (OSError, AttributeError):
        return None


class Monitor:
    def __init__(self, every: float = 0.02):
        self.every, self.peak, self.stop = every, 0, threading.Event()
        self.heap_at_peak = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            now = total_pss()
            if now > self.peak:
                self.peak, self.heap_at_peak = now, heap()
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
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    from llc_throughput import WORKLOADS, build

    from devinterp.analyses import estimate_llc, parallel, sampling

    cfg = CONFIGS[name]
    # the defaults get every core (the "auto" rule then sees them); the others one thread each
    torch.set_num_threads(len(os.sched_getaffinity(0)) if cfg["workers"] == "auto" else 1)
    if not cfg["lean"]:
        sampling.LEAN_MIN_DIM = 1 << 40
    parallel.SHARE_HEAP = cfg.get("share_heap", False)
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
    heap_before = heap()
    kwargs = {"workers": cfg["workers"]}
    # estimate_llc has no ``backend=``: the plan's choice is forced here, and every plan made
    # during the estimate is recorded (the configuration printed is the one that ran)
    plans = []
    plan = parallel.plan

    def forced_plan(*args, **kw):
        if cfg.get("backend"):
            kw["backend"] = cfg["backend"]
        out = plan(*args, **kw)
        plans.append(f"{out.workers}×{out.backend}")
        return out

    parallel.plan = forced_plan
    usage0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t0 = time.perf_counter()
    with Monitor() as mon:
        r = estimate_llc(model, (x, y), loss_fn, num_chains=chains, num_draws=draws,
                         num_burnin=0, step_size=WORKLOADS["tf10m"]["step_size"],
                         localization=100.0, batch_size=batch, num_acceptance_checks=1,
                         **kwargs)
    seconds = time.perf_counter() - t0
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(b.ru_utime - a.ru_utime + b.ru_stime - a.ru_stime for a, b in zip(usage0, usage, strict=True))
    sys_cpu = sum(b.ru_stime - a.ru_stime for a, b in zip(usage0, usage, strict=True))
    faults = sum(b.ru_minflt - a.ru_minflt for a, b in zip(usage0, usage, strict=True))
    print("RESULT " + json.dumps(dict(params=params, after_build=after_build,
                                      after_step=after_step, peak=mon.peak, seconds=seconds,
                                      llc=r.mean, cpu=cpu, sys=sys_cpu, faults=faults,
                                      heap_before=heap_before, heap_at_peak=mon.heap_at_peak,
                                      plans=plans)))


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
    tunables = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    print("malloc: " + (", ".join(f"{k}={v}" for k, v in tunables.items()) if tunables
                        else "glibc defaults (dynamic mmap threshold)"))
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.chains} chains "
          f"× {args.draws} draws, batch {args.batch} × 64 tokens; target extra ≤ chains + 2 = "
          f"{args.chains + 2} × parameters")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    goal = args.chains + 2
    verdicts, parallel = [], []
    for name in args.configs.split(","):
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--chains",
                               str(args.chains), "--draws", str(args.draws), "--batch",
                               str(args.batch)],
                              env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            verdicts.append(False)
            continue
        out = json.loads(line[0][len("RESULT "):])
        unit = 4 * out["params"]
        strict = (out["peak"] - out["after_build"]) / unit
        loose = (out["peak"] - out["after_step"]) / unit
        bound = name.startswith("lean")
        ok = strict <= goal
        if bound:
            verdicts.append(ok)
            parallel.append(f"{name} {strict:.2f}×")
        print(f"{name:20s} parameters {out['params']:,} ({unit / 2**20:.1f} MiB); "
              f"peak {out['peak'] / 2**20:7.1f} MiB; extra after build "
              f"{strict:5.2f}×, after a step {loose:5.2f}× the parameters; goal ≤ {goal}×: "
              f"{('met' if ok else 'NOT met') if bound else 'not bound'} "
              f"({out['seconds']:.1f} s, λ̂ {out['llc']:.4g}; ran as "
              f"{', '.join(dict.fromkeys(out['plans'])) or '?'})", flush=True)
        if bound:
            # the lean path's own buffers: one chain state per worker (P each: the worker's
            # chains run one after the other in it) and the MALA check buffer (1 × P, the
            # benchmark asks for one check); the rest is per worker
            workers = int((out["plans"] or ["1×"])[-1].split("×")[0])
            rest = strict - workers - 1
            line = (f"{'':20s} = chain states {workers}× (one per worker) + check buffer 1× + "
                    f"the rest {rest:5.2f}× (activations, gradients in flight, model copies, "
                    "allocator)")
            hb, hp = out["heap_before"], out["heap_at_peak"]
            if hb and hp and name != "lean-2-processes":
                line += (f"; glibc heap at the peak: {(hp[0] - hb[0]) / unit:+.2f}× in use, "
                         f"{(hp[1] - hb[1]) / unit:+.2f}× free")
            print(line)
            print(f"{'':20s} cost: {out['cpu']:.1f} cpu-s ({out['sys']:.1f} system), "
                  f"{out['faults'] / 1e3:.0f}k page faults")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"goal (extra after build ≤ chains + 2 = {goal}×) on the lean path: "
          + (("met" if all(verdicts) else "NOT met") if verdicts else "not run")
          + (f" ({', '.join(parallel)})" if parallel else ""))
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
