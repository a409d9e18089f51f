"""Throughput of LLC estimation: this library vs devinterp 2.0.1 vs a bare PyTorch SGLD loop.

Workloads (one CPU thread each):

- ``dln``: deep linear network, widths [10, 10, 10, 10, 10], rank-5 teacher, n = 10000, batch 500,
  ε = 3e-4, γ = 1, 4 chains × (500 burn-in + 1000 draws), mean squared error loss.
- ``mlp``: 784-128-128-10 ReLU MLP, cross-entropy, synthetic data n = 10000, batch 256,
  ε = 1e-5, γ = 1, 4 chains × (100 burn-in + 200 draws) (shorter: one step costs ~1 ms/chain).

Each implementation runs in a fresh subprocess per round, rounds interleaved. "cold" is the first
estimate in a fresh process (data and model already built; imports excluded); "repeated" is the
mean time per estimate over ``--calls`` estimates in one process (new weights each call, as when
walking through snapshots). devinterp 2.0.1 runs in its own virtual env (``--devinterp-python``);
it is skipped with a message when that interpreter is missing.

Usage::

    python benchmarks/llc_throughput.py [--rounds 3] [--calls 10] [--workloads dln,mlp]
        [--devinterp-python /tmp/venv-devinterp/bin/python] [--no-devinterp] [--compile]

``ours`` runs with ``compile=False`` (the eager path); ``--compile`` adds ``ours_auto``:
``compile="auto", expected_calls=--calls``, the real multi-snapshot workload, whose "repeated"
time includes the compile (when the rule chooses to compile) amortised over the calls. Every
process gets a fresh inductor cache directory, so no compile is served from a warm disk cache.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKLOADS = {
    "dln": dict(n=10_000, batch=500, step_size=3e-4, localization=1.0, chains=4, burnin=500,
                draws=1000),
    "mlp": dict(n=10_000, batch=256, step_size=1e-5, localization=1.0, chains=4, burnin=100,
                draws=200),
}


# ---------------------------------------------------------------------------------------------
# shared problem definitions (plain torch; importable in either environment)
# ---------------------------------------------------------------------------------------------
def build(workload: str, seed: int):
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear initialisation
    cfg = WORKLOADS[workload]
    n = cfg["n"]
    if workload == "dln":
        widths = [10] * 5
        layers = [nn.Linear(10, 10, bias=False) for _ in range(4)]
        with torch.no_grad():
            for lin in layers:
                lin.weight.copy_(torch.randn(10, 10, generator=gen) / math.sqrt(10))
            q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen))
            layers[0].weight.copy_(layers[0].weight @ (q[:, :5] @ q[:, :5].T))
        model = nn.Sequential(*layers)
        x = torch.randn(n, widths[0], generator=gen)
        with torch.no_grad():
            y = model(x) + 0.1 * torch.randn(n, widths[-1], generator=gen)

        def per_sample(model, xb, yb):
            return (model(xb) - yb).pow(2).mean(-1)
    else:
        model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                              nn.Linear(128, 10))
        x = torch.randn(n, 784, generator=gen)
        with torch.no_grad():
            y = model(x).argmax(-1)

        def per_sample(model, xb, yb):
            return nn.functional.cross_entropy(model(xb), yb, reduction="none")
    return model, x, y, per_sample


# ---------------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------------
def run_ours(model, x, y, per_sample, cfg, seed, **kwargs):
    from devinterp.analyses import estimate_llc

    def loss_fn(m, batch):
        return per_sample(m, batch[0], batch[1]).mean()

    res = estimate_llc(model, (x, y), loss_fn, num_chains=cfg["chains"], num_draws=cfg["draws"],
                       num_burnin=cfg["burnin"], step_size=cfg["step_size"],
                       localization=cfg["localization"], batch_size=cfg["batch"], seed=seed,
                       **kwargs)
    COMPILED.append(res.config.compiled)
    return res.mean


def run_ours_auto(model, x, y, per_sample, cfg, seed):
    """``compile="auto"`` told how many estimates the process will make (``expected_calls``):
    the deterministic rule compiles when that many estimates pay for the compile."""
    return run_ours(model, x, y, per_sample, cfg, seed, compile="auto",
                    expected_calls=cfg["expected_calls"])


def run_ours_eager(model, x, y, per_sample, cfg, seed):
    return run_ours(model, x, y, per_sample, cfg, seed, compile=False)


COMPILED: list[bool] = []


def run_bare(model, x, y, per_sample, cfg, seed):
    """A plain SGLD loop: one model copy per chain, autograd, per-parameter updates."""
    import torch

    n = len(x)
    nbeta = n / math.log(n)
    eps, gamma, b = cfg["step_size"], cfg["localization"], cfg["batch"]
    with torch.no_grad():
        init_loss = float(per_sample(model, x, y).mean())
    means = []
    for c in range(cfg["chains"]):
        chain_model = copy.deepcopy(model)
        params = [p for p in chain_model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(seed * 1000 + c)
        perm, pos = torch.randperm(n, generator=gen), 0
        losses = []
        for step in range(cfg["burnin"] + cfg["draws"]):
            if pos + b > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + b]
            pos += b
            loss = per_sample(chain_model, x[idx], y[idx]).mean()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g, a in zip(params, grads, anchor, strict=True):
                    drift = nbeta * g + gamma * (p - a)
                    p.add_(drift, alpha=-eps / 2)
                    p.add_(torch.randn(p.shape, generator=gen), alpha=math.sqrt(eps))
            if step >= cfg["burnin"]:
                losses.append(loss.detach())
        means.append(float(torch.stack(losses).mean()))
    return nbeta * (sum(means) / len(means) - init_loss)


def run_devinterp(model, x, y, per_sample, cfg, seed):
    """devinterp 2.0.1's ``llc``: it takes a HF dataset of "input_ids"; we pass sample indices
    and look the tensors up in the loss (its LM-only data path, with minimal overhead)."""
    import warnings

    import torch
    from datasets import Dataset
    from devinterp.slt.llc import llc

    n = len(x)
    ids = torch.arange(n)
    ds = Dataset.from_dict({"input_ids": torch.stack([ids, ids], 1).tolist()}).with_format("torch")

    def loss_fn(m, input_ids):
        idx = input_ids[:, 0].long()
        return per_sample(m, x[idx], y[idx])[:, None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = llc(model, ds, {}, lr=cfg["step_size"], n_beta=n / math.log(n), loss_fn=loss_fn,
                  num_chains=cfg["chains"], num_draws=cfg["draws"], batch_size=cfg["batch"],
                  num_burnin_steps=cfg["burnin"], localization=cfg["localization"],
                  num_init_loss_batches=max(1, n // cfg["batch"]), init_seed=seed,
                  device="cpu")
    return float(out["llc_mean"])


IMPLS = {"ours": run_ours_eager, "ours_auto": run_ours_auto, "bare": run_bare,
         "devinterp": run_devinterp}


def worker(impl: str, workload: str, calls: int) -> None:
    import torch

    torch.set_num_threads(1)
    cfg = dict(WORKLOADS[workload], expected_calls=calls)
    fn = IMPLS[impl]
    times, values = [], []
    for call in range(calls):
        model, x, y, per_sample = build(workload, seed=call)
        t0 = time.perf_counter()
        values.append(fn(model, x, y, per_sample, cfg, call))
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"times": times, "values": values,
                                  "compiled": any(COMPILED)}))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def spawn(impl: str, workload: str, calls: int, python: str) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    if impl != "devinterp":
        env["PYTHONPATH"] = str(REPO)
    with tempfile.TemporaryDirectory() as cache:
        # a fresh inductor cache per process: every compile is paid in full (no warm disk cache)
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        proc = subprocess.run([python, __file__, "--worker", impl, "--workload", workload,
                               "--calls", str(calls)], env=env, capture_output=True, text=True,
                              cwd=str(Path(__file__).parent))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(f"[{impl}/{workload}] failed:\n{proc.stderr[-2000:]}\n")
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(IMPLS))
    ap.add_argument("--workload", default="dln", choices=sorted(WORKLOADS))
    ap.add_argument("--workloads", default="dln,mlp")
    ap.add_argument("--calls", type=int, default=10, help="estimates per process (repeated)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--devinterp-python", default="/tmp/venv-devinterp/bin/python")
    ap.add_argument("--compile", action="store_true",
                    help="also run ours with compile='auto', expected_calls=--calls")
    ap.add_argument("--no-devinterp", action="store_true", help="skip devinterp 2.0.1")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.workload, args.calls)
        return 0
    impls = ["ours", "bare"] + (["ours_auto"] if args.compile else [])
    if args.no_devinterp:
        pass
    elif Path(args.devinterp_python).exists():
        impls.append("devinterp")
    else:
        print(f"devinterp 2.0.1 skipped: {args.devinterp_python} not found (create it with "
              "python3 -m venv /tmp/venv-devinterp && /tmp/venv-devinterp/bin/pip install "
              "torch==2.13.0 devinterp==2.0.1)")
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    for workload in args.workloads.split(","):
        cfg = WORKLOADS[workload]
        print(f"\n== {workload}: {cfg}")
        cold = {i: [] for i in impls}
        rep = {i: [] for i in impls}
        vals = {i: [] for i in impls}
        for r in range(args.rounds):
            for impl in impls:
                python = args.devinterp_python if impl == "devinterp" else sys.executable
                out = spawn(impl, workload, args.calls, python)
                if out is None:
                    continue
                cold[impl].append(out["times"][0])
                rep[impl].append(statistics.mean(out["times"]))
                vals[impl].append(out["values"][0])
                tag = " compiled" if out.get("compiled") else ""
                print(f"  round {r} {impl:9s} cold {out['times'][0]:7.3f}s  repeated "
                      f"{statistics.mean(out['times']):7.3f}s/estimate  λ̂(first)="
                      f"{out['values'][0]:.2f}{tag}", flush=True)

        def med(d, k):
            return statistics.median(d[k]) if d[k] else float("nan")

        print(f"  median seconds per estimate ({args.rounds} rounds):")
        for impl in impls:
            print(f"    {impl:9s} cold {med(cold, impl):7.3f}  repeated {med(rep, impl):7.3f}")
        mine = ["ours"] + (["ours_auto"] if args.compile else [])
        for kind, d in (("cold", cold), ("repeated", rep)):
            for ours in mine:
                for base in [i for i in impls if i not in mine]:
                    ratio = med(d, base) / med(d, ours)
                    # per-round ratios show the spread
                    per_round = [b / o for o, b in zip(d[ours], d[base], strict=False)]
                    spread = (f" (rounds {min(per_round):.2f}..{max(per_round):.2f})"
                              if per_round else "")
                    print(f"  speed-up {kind:8s} {ours:9s} vs {base:9s}: {ratio:5.2f}x{spread}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
