"""Cost of calibration against the estimate it configures (wall time, one thread).

For each model: ``calibrate(...)`` then ``estimate_llc(..., calibration=cal)`` on a prepared target
(so neither pays for data preparation), ``--rounds`` times, interleaved. Prints each ratio
calibrate/estimate and the median; the issue asks for a ratio ≤ 1.0.

Models: a deep linear network [10]*5 at a rank-5 teacher (n = 10000, batch 512) and an MLP
32-64-64-4 trained briefly with Adam on a synthetic teacher task (n = 8192, batch 512).

    OMP_NUM_THREADS=1 python benchmarks/calibration_cost.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from devinterp.analyses.calibration import calibrate
from devinterp.analyses.llc import estimate_llc
from devinterp.analyses.sampling import prepare_target
from devinterp.analyses.theory import make_dln_problem


def _ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mlp_problem(n: int = 8192, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n, 32, generator=gen)
    teacher = torch.randn(32, 4, generator=gen)
    y = (x @ teacher).argmax(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        idx = torch.randint(0, n, (256,), generator=gen)
        opt.zero_grad()
        _ce(model, (x[idx], y[idx])).backward()
        opt.step()
    return model, (x, y), _ce


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the models whose name starts so")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dln = make_dln_problem([10] * 5, 5, 10_000, 0, noise_std=0.0)
    models = {"dln [10]*5 r=5": (dln.model, dln.data, dln.loss_fn), "mlp 32-64-64-4": mlp_problem()}
    if args.only:
        models = {k: v for k, v in models.items() if k.startswith(args.only)}
    for name, (model, data, loss_fn) in models.items():
        target = prepare_target(model, data, loss_fn, batch_size=512)
        ratios = []
        for k in range(args.rounds):
            t0 = time.perf_counter()
            cal = calibrate(target, seed=k)
            t_cal = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = estimate_llc(target, calibration=cal, seed=k)
            t_est = time.perf_counter() - t0
            ratios.append(t_cal / t_est)
            print(f"{name}: round {k}: calibrate {t_cal:.1f} s, estimate {t_est:.1f} s, ratio "
                  f"{t_cal / t_est:.2f} (ε={cal.step_size:.3g}, burn-in {cal.num_burnin}, draws "
                  f"{cal.num_draws}, λ̂={res.mean:.2f})", flush=True)
        print(f"{name}: median ratio calibrate/estimate {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)


if __name__ == "__main__":
    main()
