"""Accuracy of ``estimate_llc(model, data, loss_fn, seed=s)`` (automatic calibration) against the
exact learning coefficients of deep linear networks and reduced-rank regression.

Each network sits at a noise-free teacher (so L_n(w*) = 0), n = 10000, batch 512 (the default).
Prints one line per network (exact λ, estimate ± stderr, relative error, chosen ε, burn-in, draws,
calibration/estimate wall-time ratio) and the median and maximum relative error per family.

    OMP_NUM_THREADS=1 python benchmarks/calibration_accuracy.py [--seed 0] [--family dln|rrr|all]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from devinterp.analyses import estimate_llc
from devinterp.analyses.theory import make_dln_problem, make_rrr_problem

#: (widths, true rank) of the deep linear networks.
DLNS = [([10] * 5, 5), ([4, 5, 6, 4], 1), ([6, 6, 6, 6], 2), ([10, 10, 10, 10], 3),
        ([3, 8, 8, 3], 1), ([8, 6, 4, 6, 8], 2)]
#: (M, H, N, r) of the reduced-rank regressions.
RRRS = [(5, 3, 5, 1), (5, 4, 5, 0), (4, 3, 8, 1), (6, 2, 3, 1), (6, 3, 4, 1)]


def problems(family: str, n: int = 10_000, seed: int = 0) -> list:
    out = []
    if family in ("dln", "all"):
        out += [make_dln_problem(w, r, n, seed, noise_std=0.0) for w, r in DLNS]
    if family in ("rrr", "all"):
        out += [make_rrr_problem(m, h, k, r, n, seed, noise_std=0.0) for m, h, k, r in RRRS]
    return out


def run_one(problem, seed: int) -> dict:
    t0 = time.perf_counter()
    res = estimate_llc(problem.model, problem.data, problem.loss_fn, seed=seed)
    total = time.perf_counter() - t0
    cal = res.calibration
    return {"description": problem.description, "llc": problem.llc, "estimate": res.mean,
            "stderr": res.stderr, "rel": (res.mean - problem.llc) / problem.llc,
            "step_size": cal.step_size, "num_burnin": cal.num_burnin, "num_draws": cal.num_draws,
            "ratio": cal.seconds / max(total - cal.seconds, 1e-9), "warnings": res.warnings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", default="all", choices=["dln", "rrr", "all"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for p in problems(args.family):
        r = run_one(p, args.seed)
        rows.append(r)
        print(f"{r['description']:42s} λ={r['llc']:6.2f}  λ̂={r['estimate']:7.2f} ± "
              f"{r['stderr']:.2f}  rel {r['rel']:+6.1%}  ε={r['step_size']:.3g} "
              f"burn-in {r['num_burnin']} draws {r['num_draws']}  calib/estimate "
              f"{r['ratio']:.2f}  warnings {len(r['warnings'])}", flush=True)
    for fam in ("DLN", "RRR"):
        errs = [abs(r["rel"]) for r in rows if r["description"].startswith(fam)]
        if errs:
            print(f"{fam}: median |rel| {statistics.median(errs):.1%}, max {max(errs):.1%} "
                  f"over {len(errs)} networks")


if __name__ == "__main__":
    main()
