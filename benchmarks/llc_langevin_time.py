"""How λ̂ on a larger deep linear network depends on the Langevin time ε·t and on γ.

Runs long chains (2 chains, 500 burn-in + 5,500 draws, no budget) on the DLN
[20, 30, 30, 20] at a rank-5 teacher (exact λ = 196, n = 10000, batch 512) at one step size and
prints λ̂ over successive windows of 1,000 draws, for each localization γ. With γ = 1 the
windows keep rising (the chains drift along the network's rescaling valleys into regions of
higher curvature, where the same ε has a larger discretisation bias); a larger γ stops the drift
but pulls λ̂ far below λ. This is why the calibration fills the budget with longer chains and
why the estimate at a fixed budget depends on ε·t (docs/calibration.md).

    OMP_NUM_THREADS=1 python benchmarks/llc_langevin_time.py [--step-size 2.28e-5] [--gammas 1,100,1000]
"""

from __future__ import annotations

import argparse

import torch

from devinterp.analyses import estimate_llc
from devinterp.analyses.sampling import prepare_target
from devinterp.analyses.theory import make_dln_problem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step-size", type=float, default=2.28e-5)
    ap.add_argument("--gammas", default="1,100,1000")
    ap.add_argument("--draws", type=int, default=5500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = make_dln_problem([20, 30, 30, 20], 5, 10_000, 0, noise_std=0.0)
    target = prepare_target(p.model, p.data, p.loss_fn, batch_size=512)
    for gamma in (float(g) for g in args.gammas.split(",")):
        res = estimate_llc(target, step_size=args.step_size, localization=gamma, num_chains=2,
                           num_burnin=500, num_draws=args.draws, seed=0, budget=None,
                           progress=False)
        trace = res.loss_trace.mean(0)
        windows = [res.config.nbeta * (trace[i:i + 1000].mean() - res.init_loss)
                   for i in range(0, args.draws, 1000)]
        print(f"γ={gamma:g} ε={args.step_size:g}: exact λ={p.llc:g}, λ̂={res.mean:.1f}; per "
              f"1000 draws (ε·t at the window's end: "
              f"{', '.join(f'{args.step_size * (500 + min(i + 1000, args.draws)):.3f}' for i in range(0, args.draws, 1000))}): "
              f"{[round(float(w)) for w in windows]}; acceptance "
              f"{res.diagnostics.acceptance:.2f}", flush=True)


if __name__ == "__main__":
    main()
