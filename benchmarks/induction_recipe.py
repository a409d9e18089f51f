"""Measure how fast the reference recipe grows an induction head, over several seeds.

For each seed, trains ``induction_recipe()`` for its full ``steps`` with a plain PyTorch loop and
reports the step and training wall time (scoring excluded) at which the max induction score first
reaches 0.6 and half of its final value, plus the loss curve. Run:

    OMP_NUM_THREADS=1 python benchmarks/induction_recipe.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import time

import torch

from devinterp.models import induction_recipe, train_induction_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = induction_recipe()
    print(f"recipe: {recipe}")
    for seed in args.seeds:
        t0 = time.perf_counter()
        _, log = train_induction_model(recipe, seed=seed, eval_every=args.eval_every, score_sequences=16)
        wall = time.perf_counter() - t0
        final = log.max_induction[-1]
        half, at06 = log.crossing(final / 2), log.crossing(0.6)
        fmt = lambda c: "never" if c is None else f"step {c[0]} ({c[1]:.1f} s)"  # noqa: E731
        losses = log.losses
        curve = [round(sum(losses[s - 25:s]) / 25, 2) for s in range(25, len(losses) + 1, 50)]
        print(f"seed {seed}: final max induction {final:.2f}; half-final at {fmt(half)}; "
              f"0.6 at {fmt(at06)}; train {log.seconds[-1]:.1f} s, wall incl. scoring {wall:.1f} s")
        print(f"  loss (mean of 25 steps, every 50): {curve}")


if __name__ == "__main__":
    main()
