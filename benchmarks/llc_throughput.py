"""Throughput of LLC estimation: this library vs devinterp 2.0.1 vs a bare PyTorch SGLD loop.

Workloads (one CPU thread each, unless ``--machine-defaults``):

- ``dln``: deep linear network, widths [10, 10, 10, 10, 10], rank-5 teacher, n = 10000, batch 500,
  ε = 3e-4, γ = 1, 4 chains × (500 burn-in + 1000 draws), mean squared error loss.
- ``mlp``: 784-128-128-10 ReLU MLP, cross-entropy, synthetic data n = 10000, batch 256,
  ε = 1e-5, γ = 1, 4 chains × (100 burn-in + 200 draws) (shorter: one step costs ~1 ms/chain).
- ``transformer``: attention-only transformer (2 layers, d_model 128, 4 heads, vocab 256,
  206,080 parameters), next-token cross-entropy on n = 1024 random 65-token sequences, batch
  32 × 64 tokens, ε = 1e-5, γ = 100, 4 chains × 80 draws (no burn-in: devinterp 2.0.1 averages
  its burn-in into λ̂, so with none both estimate the same quantity).
- ``tf2m`` / ``tf10m``: the same family at 2.1M (4 layers, d_model 256, vocab 2048) and 10.0M
  parameters (8 layers, d_model 512, vocab 1536), batch 8 × 64 tokens, 2 chains × 12 draws:
  throughput at scale (chain-steps/s and parameter·tokens/s are printed).

``--machine-defaults``: every implementation gets the whole machine the way it uses it by default:
no thread limits (PyTorch's intra-op threads = all cores for devinterp 2.0.1 and the bare loop,
which run chains one after the other), and ours with its default ``workers="auto"`` (chains on
every core, one intra-op thread each, on threads). ``ours_process`` runs the chain workers as
forked processes (the processes-vs-threads measurement of docs/llc.md; measured as
``ours_thread`` against ``ours`` = processes before threads became the default). The rounds are interleaved and the machine's
load average is printed before each round.

Each implementation runs in a fresh subprocess per round, rounds interleaved. "cold" is the first
estimate in a fresh process (data and model already built; imports excluded); "repeated" is the
mean time per estimate over ``--calls`` estimates in one process (new weights each call, as when
walking through snapshots). devinterp 2.0.1 runs in its own virtual env (``--devinterp-python``);
it is skipped with a message when that interpreter is missing.

Every estimate's CPU time (user + system of every thread and finished child process) is
recorded too and printed as CPU-time ratios next to the wall-time ones: robust to the machine's
load where wall time is not (with ``--machine-defaults`` the sequential implementations' OpenMP
threads also count their spin-waiting). ``--step-cpu`` measures the sampling loop alone, CPU time
per chain-step in one process (:func:`step_cpu`): the bare loop, ours, and ours as it ran before
the per-chain backward and the in-place update.

Usage::

    python benchmarks/llc_throughput.py [--rounds 3] [--calls 10] [--workloads dln,mlp]
        [--devinterp-python /tmp/venv-devinterp/bin/python] [--no-devinterp] [--compile]
    python benchmarks/llc_throughput.py --workloads transformer --machine-defaults --calls 1
    python benchmarks/llc_throughput.py --workloads tf2m,tf10m --calls 1 --rounds 1 --no-devinterp
    python benchmarks/llc_throughput.py --step-cpu --workloads transformer --rounds 12

devinterp 2.0.1's environment::

    python3 -m venv /tmp/venv-devinterp && /tmp/venv-devinterp/bin/pip install torch==2.13.0 \
        devinterp==2.0.1

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
    "transformer": dict(n=1024, batch=32, step_size=1e-5, localization=100.0, chains=4, burnin=0,
                        draws=80, vocab=256, d_model=128, layers=2, heads=4, seq=64),
    "tf2m": dict(n=256, batch=8, step_size=1e-6, localization=100.0, chains=2, burnin=0,
                 draws=12, vocab=2048, d_model=256, layers=4, heads=4, seq=64),
    "tf10m": dict(n=256, batch=8, step_size=1e-6, localization=100.0, chains=2, burnin=0,
                  draws=12, vocab=1536, d_model=512, layers=8, heads=8, seq=64),
}
TRANSFORMERS = ("transformer", "tf2m", "tf10m")


def attention_only_transformer(vocab: int, d_model: int, layers: int, heads: int, seq: int):
    """A plain-torch attention-only transformer (importable in devinterp 2.0.1's env too)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.out = nn.Linear(d_model, d_model)

        def forward(self, x):
            B, T, d = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(z.transpose(1, 2).reshape(B, T, d))

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.pos = nn.Parameter(torch.randn(seq, d_model) / math.sqrt(d_model))
            self.blocks = nn.ModuleList(Attention() for _ in range(layers))
            self.unembed = nn.Linear(d_model, vocab)

        def forward(self, tokens):
            x = self.embed(tokens) + self.pos[:tokens.shape[1]]
            for block in self.blocks:
                x = x + block(x)
            return self.unembed(x)

    return Transformer()


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
    if workload in TRANSFORMERS:
        import torch.nn.functional as F

        model = attention_only_transformer(cfg["vocab"], cfg["d_model"], cfg["layers"],
                                           cfg["heads"], cfg["seq"])
        x = torch.randint(0, cfg["vocab"], (n, cfg["seq"] + 1), generator=gen)
        y = torch.zeros(n)

        def per_sample(model, xb, yb):
            logits = model(xb[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1),
                                 reduction="none")
            return ce.view(len(xb), -1).mean(-1)
    elif workload == "dln":
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

    kwargs.setdefault("workers", "auto" if cfg.get("machine_defaults") else 1)
    res = estimate_llc(model, (x, y), loss_fn, num_chains=cfg["chains"], num_draws=cfg["draws"],
                       num_burnin=cfg["burnin"], step_size=cfg["step_size"],
                       localization=cfg["localization"], batch_size=cfg["batch"], seed=seed,
                       **kwargs)
    COMPILED.append(res.config.compiled)
    STDERR.append(res.stderr)
    return res.mean


def run_ours_process(model, x, y, per_sample, cfg, seed):
    """Ours with the chain workers as forked processes instead of threads (the default)."""
    from devinterp.analyses import parallel

    plan = parallel.plan
    parallel.plan = lambda *a, **k: plan(*a, **{**k, "backend": k.get("backend") or "process"})
    return run_ours(model, x, y, per_sample, cfg, seed, compile=False)


def run_ours_auto(model, x, y, per_sample, cfg, seed):
    """``compile="auto"`` told how many estimates the process will make (``expected_calls``):
    the deterministic rule compiles when that many estimates pay for the compile."""
    return run_ours(model, x, y, per_sample, cfg, seed, compile="auto",
                    expected_calls=cfg["expected_calls"])


def run_ours_eager(model, x, y, per_sample, cfg, seed):
    return run_ours(model, x, y, per_sample, cfg, seed, compile=False)


COMPILED: list[bool] = []
STDERR: list[float] = []


def run_bare(model, x, y, per_sample, cfg, seed):
    """A plain SGLD loop: one model copy per chain, autograd, per-parameter updates."""
    import torch

    n = len(x)
    nbeta = n / math.log(n)
    with torch.no_grad():
        init_loss = float(per_sample(model, x, y).mean())
    means = []
    for c in range(cfg["chains"]):
        losses = bare_chain(model, x, y, per_sample, cfg, cfg["burnin"] + cfg["draws"],
                            seed * 1000 + c)
        means.append(float(torch.stack(losses[cfg["burnin"]:]).mean()))
    per_chain = [nbeta * (m - init_loss) for m in means]
    if len(per_chain) > 1:
        STDERR.append(statistics.stdev(per_chain) / math.sqrt(len(per_chain)))
    return sum(per_chain) / len(per_chain)


def bare_chain(model, x, y, per_sample, cfg, steps, seed):
    """One chain of the bare loop: its minibatch losses (``steps`` SGLD steps from ``model``)."""
    import torch

    n = len(x)
    nbeta = n / math.log(n)
    eps, gamma, b = cfg["step_size"], cfg["localization"], cfg["batch"]
    chain_model = copy.deepcopy(model)
    params = [p for p in chain_model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    losses = []
    for _ in range(steps):
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
        losses.append(loss.detach())
    return losses


def step_cpu(workload: str, rounds: int, steps: int, chains: int) -> None:
    """CPU time per chain-step of the sampling loop alone, one intra-op thread, in one process:
    the bare loop vs ours (``run_chains`` as ``sample_chains`` runs it) vs ours as it was before
    the per-chain backward and the in-place update (``PER_CHAIN_BACKWARD_MIN_BYTES`` above any
    model's activations, ``reuse_buffers=False``). Short bursts of ``steps`` steps of ``chains`` chains,
    interleaved; user + system CPU time (``getrusage``, robust to other processes' load, unlike
    wall time) and minor page faults per chain-step. No estimate-level work (L(w*), MALA checks,
    planning) is included: this is the per-step overhead against a bare loop."""
    import resource

    import torch

    from devinterp.analyses import sampling

    torch.set_num_threads(1)
    cfg = WORKLOADS[workload]
    model, x, y, per_sample = build(workload, 0)
    n = len(x)

    def loss_fn(m, batch):
        return per_sample(m, batch[0], batch[1]).mean()

    target = sampling.prepare_target(model, (x, y), loss_fn, batch_size=cfg["batch"],
                                     compile=False)
    run = dict(num_chains=chains, num_steps=steps, step_size=cfg["step_size"],
               localization=cfg["localization"], nbeta=n / math.log(n), seed=0, compile=False)
    fresh = sampling.PER_CHAIN_BACKWARD_MIN_BYTES

    def ours(before: bool) -> list:
        sampling.PER_CHAIN_BACKWARD_MIN_BYTES = 1 << 62 if before else fresh
        out = [(info.loss.clone(), info.correction.clone(), state.params.clone())
               for _, state, info in sampling.run_chains(target, reuse_buffers=not before, **run)]
        sampling.PER_CHAIN_BACKWARD_MIN_BYTES = fresh
        return out

    variants = {"bare": lambda: [bare_chain(model, x, y, per_sample, cfg, steps, c)
                                 for c in range(chains)],
                "ours_before": lambda: ours(True), "ours": lambda: ours(False)}
    same = all(torch.equal(a, b) for u, v in zip(ours(True), ours(False), strict=True)
               for a, b in zip(u, v, strict=True))
    print(f"ours and ours_before: losses, corrections and parameters bitwise equal: {same}")
    for f in variants.values():  # warm-up
        f()
    rows = {k: [] for k in variants}
    for r in range(rounds):
        for k, f in variants.items():
            a = resource.getrusage(resource.RUSAGE_SELF)
            f()
            z = resource.getrusage(resource.RUSAGE_SELF)
            per = steps * chains
            rows[k].append(((z.ru_utime - a.ru_utime) / per * 1e3,
                            (z.ru_stime - a.ru_stime) / per * 1e3,
                            (z.ru_minflt - a.ru_minflt) / per))
        if r == 0 or r + 1 == rounds:
            print(f"  round {r}: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
                  flush=True)
    cpu = {k: [u + s for u, s, _ in v] for k, v in rows.items()}
    print(f"  CPU ms per chain-step ({rounds} rounds of {chains} chains x {steps} steps, "
          "one thread): median / lower quartile; user, system, page faults (medians)")
    for k, v in rows.items():
        q1 = statistics.quantiles(cpu[k], n=4)[0]
        print(f"    {k:12s} {statistics.median(cpu[k]):7.2f} / {q1:7.2f}   user "
              f"{statistics.median(u for u, _, _ in v):7.2f}  sys "
              f"{statistics.median(s for _, s, _ in v):5.2f}  faults "
              f"{statistics.median(f for _, _, f in v):6.0f}")
    for k in ("ours_before", "ours"):
        per_round = [b / o for o, b in zip(cpu[k], cpu["bare"], strict=True)]
        print(f"  speed-up per step {k:12s} vs bare (CPU time): "
              f"{statistics.median(cpu['bare']) / statistics.median(cpu[k]):.3f}x median, "
              f"rounds {statistics.quantiles(per_round, n=4)[0]:.3f}..{statistics.quantiles(per_round, n=4)[2]:.3f} (quartiles)")


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
    per_chain = [float(v) for v in out["llc_per_chain"].values]
    if len(per_chain) > 1:
        STDERR.append(statistics.stdev(per_chain) / math.sqrt(len(per_chain)))
    return float(out["llc_mean"])


IMPLS = {"ours": run_ours_eager, "ours_auto": run_ours_auto, "bare": run_bare,
         "devinterp": run_devinterp, "ours_process": run_ours_process}


def worker(impl: str, workload: str, calls: int, machine_defaults: bool) -> None:
    import torch

    if not machine_defaults:
        torch.set_num_threads(1)
    cfg = dict(WORKLOADS[workload], expected_calls=calls, machine_defaults=machine_defaults)
    fn = IMPLS[impl]
    import resource

    times, values, cpu = [], [], []
    for call in range(calls):
        model, x, y, per_sample = build(workload, seed=call)
        def used() -> float:  # this process and its finished children (ours_process)
            return sum(r.ru_utime + r.ru_stime for r in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN)))

        t0, c0 = time.perf_counter(), used()
        values.append(fn(model, x, y, per_sample, cfg, call))
        times.append(time.perf_counter() - t0)
        cpu.append(used() - c0)
    print("RESULT " + json.dumps({"times": times, "values": values, "stderr": STDERR,
                                  "compiled": any(COMPILED),
                                  "threads": torch.get_num_threads(), "cpu": cpu}))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def spawn(impl: str, workload: str, calls: int, python: str,
          machine_defaults: bool = False) -> dict | None:
    drop = ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if machine_defaults else (
        "PYTHONPATH",)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if not machine_defaults:
        env["OMP_NUM_THREADS"] = "1"
        env["MKL_NUM_THREADS"] = "1"
    if impl != "devinterp":
        env["PYTHONPATH"] = str(REPO)
    with tempfile.TemporaryDirectory() as cache:
        # a fresh inductor cache per process: every compile is paid in full (no warm disk cache)
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        proc = subprocess.run([python, __file__, "--worker", impl, "--workload", workload,
                               "--calls", str(calls)]
                              + (["--machine-defaults"] if machine_defaults else []),
                              env=env, capture_output=True, text=True,
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
    ap.add_argument("--impls", help="only these implementations (comma-separated), e.g. "
                    "ours,ours_process")
    ap.add_argument("--machine-defaults", action="store_true",
                    help="no thread limits: every implementation uses all cores its own way; "
                         "adds ours_process (chain workers as processes rather than threads)")
    ap.add_argument("--step-cpu", action="store_true",
                    help="CPU time per chain-step of the sampling loop alone (bare loop vs ours "
                         "vs ours before the in-place update), one process, one thread")
    ap.add_argument("--steps", type=int, default=4, help="steps per burst with --step-cpu")
    ap.add_argument("--chains", type=int, default=2, help="chains per burst with --step-cpu "
                    "(2: one worker's group on 2 cores)")
    args = ap.parse_args()
    if args.step_cpu:
        print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
        for workload in args.workloads.split(","):
            print(f"\n== {workload}: sampling loop only")
            step_cpu(workload, args.rounds, args.steps, args.chains)
        return 0
    if args.worker:
        worker(args.worker, args.workload, args.calls, args.machine_defaults)
        return 0
    impls = (["ours", "bare"] + (["ours_auto"] if args.compile else [])
             + (["ours_process"] if args.machine_defaults else []))
    if args.no_devinterp:
        pass
    elif Path(args.devinterp_python).exists():
        impls.append("devinterp")
    else:
        print(f"devinterp 2.0.1 skipped: {args.devinterp_python} not found (create it with "
              "python3 -m venv /tmp/venv-devinterp && /tmp/venv-devinterp/bin/pip install "
              "torch==2.13.0 devinterp==2.0.1)")
    if args.impls:
        impls = [i for i in args.impls.split(",") if i in impls]
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"cores: {os.cpu_count()}; mode: "
          f"{'machine defaults (no thread limits)' if args.machine_defaults else 'one thread each'}")
    for workload in args.workloads.split(","):
        cfg = WORKLOADS[workload]
        print(f"\n== {workload}: {cfg}")
        if workload in TRANSFORMERS:
            model = build(workload, 0)[0]
            print(f"  parameters: {sum(p.numel() for p in model.parameters()):,}")
        cold = {i: [] for i in impls}
        rep = {i: [] for i in impls}
        vals = {i: [] for i in impls}
        errs = {i: [] for i in impls}
        cpus = {i: [] for i in impls}  # CPU seconds (user + system, every thread) of "cold"
        for r in range(args.rounds):
            print(f"  round {r}: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
                  flush=True)
            for impl in impls:
                python = args.devinterp_python if impl == "devinterp" else sys.executable
                out = spawn(impl, workload, args.calls, python, args.machine_defaults)
                if out is None:
                    continue
                cold[impl].append(out["times"][0])
                cpus[impl].append(out["cpu"][0])
                rep[impl].append(statistics.mean(out["times"]))
                vals[impl].append(out["values"][0])
                se = out["stderr"][0] if out.get("stderr") else float("nan")
                errs[impl].append(se)
                tag = " compiled" if out.get("compiled") else ""
                steps = cfg["chains"] * (cfg["burnin"] + cfg["draws"])
                rate = steps / out["times"][0]
                print(f"  round {r} {impl:11s} cold {out['times'][0]:7.3f}s  repeated "
                      f"{statistics.mean(out['times']):7.3f}s/estimate  λ̂(first)="
                      f"{out['values'][0]:.2f} ± {se:.2f}  {rate:.2f} chain-steps/s"
                      f"{tag}", flush=True)

        def med(d, k):
            return statistics.median(d[k]) if d[k] else float("nan")

        print(f"  median seconds per estimate ({args.rounds} rounds):")
        for impl in impls:
            print(f"    {impl:11s} cold {med(cold, impl):7.3f}  repeated {med(rep, impl):7.3f}  "
                  f"CPU (cold) {med(cpus, impl):7.3f}")
        if workload in TRANSFORMERS:
            params = sum(p.numel() for p in build(workload, 0)[0].parameters())
            tokens = cfg["batch"] * cfg["seq"]
            steps = cfg["chains"] * (cfg["burnin"] + cfg["draws"])
            for impl in impls:
                rate = steps / med(cold, impl)
                print(f"    {impl:11s} {rate:8.3f} chain-steps/s = {rate * params * tokens:.3g} "
                      "parameter·tokens/s")
        if vals.get("ours"):
            for base in [i for i in impls if i != "ours" and vals[i]]:
                a, b = vals["ours"][0], vals[base][0]
                sa, sb = errs["ours"][0], errs[base][0]
                z = abs(a - b) / math.sqrt(sa ** 2 + sb ** 2) if sa > 0 and sb > 0 else float("nan")
                print(f"  λ̂ ours {a:.3f} ± {sa:.3f} vs {base} {b:.3f} ± {sb:.3f}: "
                      f"{z:.2f} combined stderr apart (first round)")
        if cold.get("ours") and cold.get("ours_process"):
            per_round = [t / o for o, t in zip(cold["ours"], cold["ours_process"], strict=False)]
            print(f"  processes vs threads (ours_process / ours wall time): "
                  f"{med(cold, 'ours_process') / med(cold, 'ours'):.2f}x (rounds "
                  f"{min(per_round):.2f}..{max(per_round):.2f})")
        mine = ["ours"] + (["ours_auto"] if args.compile else []) + (
            ["ours_process"] if args.machine_defaults else [])
        for kind, d in (("cold", cold), ("repeated", rep)):
            for ours in mine:
                for base in [i for i in impls if i not in mine]:
                    ratio = med(d, base) / med(d, ours)
                    # per-round ratios show the spread
                    per_round = [b / o for o, b in zip(d[ours], d[base], strict=False)]
                    spread = (f" (rounds {min(per_round):.2f}..{max(per_round):.2f})"
                              if per_round else "")
                    print(f"  speed-up {kind:8s} {ours:11s} vs {base:11s}: {ratio:5.2f}x{spread}")
        for ours in mine:  # robust to the machine's load; with --machine-defaults the
            # intra-op threads of the others also count their OpenMP spin-waiting
            for base in [i for i in impls if i not in mine and cpus[i] and cpus[ours]]:
                per_round = [b / o for o, b in zip(cpus[ours], cpus[base], strict=False)]
                print(f"  CPU-time ratio cold {ours:11s} vs {base:11s}: "
                      f"{med(cpus, base) / med(cpus, ours):5.2f}x (rounds "
                      f"{min(per_round):.2f}..{max(per_round):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
