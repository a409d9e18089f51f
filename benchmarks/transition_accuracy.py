"""Accuracy of detect_transitions on seeded synthetic curves, by noise type and curve length.

Usage: python benchmarks/transition_accuracy.py [--seed 0] [--curves 300]

For each (noise, length bucket) cell, ``--curves`` curves are drawn with
:func:`devinterp.analyses.synthetic.synthetic_curve` (0, 1, 2 transitions in turn; drift family,
widths, amplitudes 6-14 noise sd, positions random). A flag hits a true transition when
``|log(flag+1) - log(mid+1)| <= log(1.5) + width`` (one-to-one, closest first).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from devinterp.analyses.synthetic import score, synthetic_curve
from devinterp.analyses.transitions import detect_transitions

BUCKETS = ((20, 60), (60, 300), (300, 2000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curves", type=int, default=300, help="curves per cell")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'noise':<10} {'points':<10} {'curves':>6} {'recall':>7} {'precision':>9} "
          f"{'false/drift':>11} {'ms/curve':>9}")
    all_curves, all_flags = [], []
    for noise in ("gaussian", "student_t"):
        for lo, hi in BUCKETS:
            curves = [
                synthetic_curve(rng, n_points=int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))),
                                n_transitions=i % 3, noise=noise)
                for i in range(args.curves)
            ]
            t0 = time.perf_counter()
            flags = [[t.step for t in detect_transitions(c.steps, c.values)] for c in curves]
            ms = 1000 * (time.perf_counter() - t0) / len(curves)
            s = score(curves, flags)
            all_curves += curves
            all_flags += flags
            print(f"{noise:<10} {f'{lo}-{hi}':<10} {len(curves):>6} {s.recall:>7.3f} {s.precision:>9.3f} "
                  f"{s.false_flags_per_drift_curve:>11.3f} {ms:>9.1f}")
    s = score(all_curves, all_flags)
    print(f"{'all':<10} {'20-2000':<10} {len(all_curves):>6} {s.recall:>7.3f} {s.precision:>9.3f} "
          f"{s.false_flags_per_drift_curve:>11.3f}")


if __name__ == "__main__":
    main()
