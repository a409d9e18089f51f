"""Long chains from w*: the plain LLC estimate and the step-size-corrected one per window of steps.

For a deep linear network (or reduced-rank regression: ``--widths M,H,N``) at a noise-free
teacher (n = 10000, batch 512), runs chains of ``--steps`` steps from w* (no burn-in, no budget)
at each ε·h of ``--epsh`` (h: the largest curvature of the potential at w*, as the calibration
measures it) and prints, per window of steps, the relative error of

- the plain estimate ``nβ·(mean L − L_n(w*))``, and
- the corrected one, less the mean of ``ε/8·∇(nβL)·∇U`` (docs/llc.md, "Step-size correction"),

and the mean of the second half of the windows. A plain estimate that moves with ε at equal
steps is the sampler's discretisation bias; one that keeps rising with the steps while the
corrected one is flat is bias growing as the chains drift into sharper regions; a corrected one
that settles away from λ at every ε is the estimator's (finite nβ, γ) bias; one still rising at
the end is a chain too short for the slow directions. docs/calibration.md ("Diagnosis") quotes
its output.

    OMP_NUM_THREADS=1 python benchmarks/llc_step_size_correction.py --widths 6,2,3 --rank 1 \\
        --seed 1 --steps 8000 --chains 4 --epsh 1,0.5,0.25
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from devinterp.analyses.calibration import top_curvature
from devinterp.analyses.sampling import default_nbeta, prepare_target, run_chains
from devinterp.analyses.theory import make_dln_problem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="20,30,30,20")
    ap.add_argument("--rank", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epsh", default="1,0.5,0.25", help="step sizes as ε·h")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--gamma", type=float, default=1.0, help="localization γ")
    ap.add_argument("--nbeta-factor", type=float, default=1.0, help="nβ = factor·n/log n")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = make_dln_problem([int(x) for x in args.widths.split(",")], args.rank, 10_000, args.seed,
                         noise_std=0.0)
    target = prepare_target(p.model, p.data, p.loss_fn, batch_size=512)
    nbeta, gamma = args.nbeta_factor * default_nbeta(target.n), args.gamma
    h = nbeta * top_curvature(target, seed=args.seed) + gamma
    print(f"{p.description} seed {args.seed}: d={p.num_params} λ={p.llc} h={h:.4g} γ={gamma:g} "
          f"nβ={nbeta:.0f}, {args.chains} chains × {args.steps} steps from w*", flush=True)
    for eh in (float(x) for x in args.epsh.split(",")):
        eps, t0 = eh / h, time.perf_counter()
        losses = np.zeros((args.chains, args.steps))
        corr = np.zeros((args.chains, args.steps))
        for step, _, info in run_chains(target, num_chains=args.chains, num_steps=args.steps,
                                        step_size=eps, localization=gamma, nbeta=nbeta,
                                        seed=args.seed, compile=False):
            losses[:, step] = info.loss.numpy()
            corr[:, step] = info.correction.numpy()
        w = args.steps // args.windows
        plain = [nbeta * (losses[:, i:i + w].mean() - target.init_loss) / p.llc - 1
                 for i in range(0, w * args.windows, w)]
        fixed = [(nbeta * (losses[:, i:i + w].mean() - target.init_loss) - corr[:, i:i + w].mean())
                 / p.llc - 1 for i in range(0, w * args.windows, w)]
        k = len(plain) // 2
        print(f" ε·h={eh:<6g} plain:     {' '.join(f'{x:+.2f}' for x in plain)}  second half "
              f"{np.mean(plain[k:]):+.3f}\n {'':9} corrected: {' '.join(f'{x:+.2f}' for x in fixed)}"
              f"  second half {np.mean(fixed[k:]):+.3f}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
