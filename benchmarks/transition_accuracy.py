"""Accuracy of detect_transitions on seeded synthetic curves, overall and per bucket.

Usage: python benchmarks/transition_accuracy.py [--seeds 0 1 2] [--curves 600] [--min-change 0.05]

For each seed, ``--curves`` curves are drawn with :func:`devinterp.analyses.synthetic.curve_suite`:
10-2000 log-spaced, jittered points (log-uniform), 0-3 transitions per curve (fewer on short
curves), widths log-uniform in 0.02-0.3 log-step units, amplitudes 6-14 noise sd, drift (power-law,
linear, quadratic, broad tanh) up to 40 noise sd, Gaussian / Student-t(3) / Laplace noise, and a
random scale and offset. A flag hits a true transition when
``|log(flag+1) - log(mid+1)| <= log(1.5) + width`` (one-to-one, closest first).

Reported: recall, precision and false flags per drift-only curve, overall and per bucket. Buckets
of a true transition (width, amplitude) carry recall only: a false flag has no width. ``moving
width a-b`` is the width bucket without the transitions that drift cancels across their own span
(the noise-free curve moves less than 10% of its range between the samples bracketing the 10-90%
span, :func:`~devinterp.analyses.synthetic.clean_move`); ``drift-cancelled`` is those alone. The
detector does not flag a change of the data smaller than ``min_change`` (0.1) of the range, the
real-run "tiny flag" rule, so those are misses by design.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from devinterp.analyses.synthetic import clean_move, curve_suite, match_detail
from devinterp.analyses.transitions import detect_transitions

WIDTH_BUCKETS = ((0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.3))
AMP_BUCKETS = ((6, 8), (8, 10), (10, 12), (12, 14))
LENGTH_BUCKETS = ((10, 30), (30, 100), (100, 500), (500, 2001))
MIN_MOVE = 0.1  # the detector's default min_change


def evaluate(curves, flags) -> dict:
    """Counts overall and per bucket from curves and their flagged steps."""
    rows: dict[str, dict[str, float]] = {}

    def add(key, tp=0, fn=0, fp=0, null=0, null_flags=0):
        r = rows.setdefault(key, dict(tp=0, fn=0, fp=0, null=0, null_flags=0))
        r["tp"] += tp
        r["fn"] += fn
        r["fp"] += fp
        r["null"] += null
        r["null_flags"] += null_flags

    for curve, steps in zip(curves, flags, strict=True):
        hits, fp = match_detail(curve, steps)
        tp = sum(hits)
        n = curve.steps.size
        null = int(not curve.midpoints)
        length = next(f"points {a}-{min(b, 2000)}" for a, b in LENGTH_BUCKETS if a <= n < b)
        for key in ("all", length, f"noise {curve.noise}", f"drift {curve.drift}"):
            add(key, tp=tp, fn=len(hits) - tp, fp=fp, null=null, null_flags=len(steps) * null)
        for k, (hit, w, a) in enumerate(zip(hits, curve.widths, curve.amplitudes, strict=True)):
            wk = next(f"width {lo}-{hi}" for lo, hi in WIDTH_BUCKETS if lo <= w <= hi)
            ak = next(f"amplitude {lo}-{hi}" for lo, hi in AMP_BUCKETS if lo <= abs(a) <= hi)
            mk = f"moving {wk}" if clean_move(curve, k) >= MIN_MOVE else "drift-cancelled"
            for key in (wk, ak, mk):
                add(key, tp=int(hit), fn=int(not hit))
    out = {}
    for key, r in rows.items():
        t = r["tp"] + r["fn"]
        d = r["tp"] + r["fp"]
        per_curve = not key.startswith(("width", "amplitude", "moving", "drift-cancelled"))
        out[key] = dict(
            transitions=t, recall=r["tp"] / t if t else float("nan"),
            precision=(r["tp"] / d if d else 1.0) if per_curve else float("nan"),
            null_curves=r["null"],
            false_per_null=(r["null_flags"] / r["null"] if r["null"] else float("nan")) if per_curve
            else float("nan"),
        )
    return out


def order(key: str):
    kinds = ("all", "width", "moving", "drift-cancelled", "amplitude", "points", "noise", "drift")
    kind = next(i for i, k in enumerate(kinds) if key.startswith(k))
    num = [float(v) for v in key.split()[-1].split("-") if v.replace(".", "").isdigit()]
    return kind, num[0] if num else 0.0, key


def run(seed: int, n_curves: int, **detector_kwargs) -> tuple[dict, float]:
    curves = curve_suite(seed, n_curves)
    t0 = time.perf_counter()
    flags = [[t.step for t in detect_transitions(c.steps, c.values, **detector_kwargs)] for c in curves]
    ms = 1000 * (time.perf_counter() - t0) / len(curves)
    return evaluate(curves, flags), ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--curves", type=int, default=600, help="curves per seed")
    ap.add_argument("--min-change", type=float, default=None, help="detector min_change (default: its own)")
    args = ap.parse_args()
    kwargs = {} if args.min_change is None else {"min_change": args.min_change}
    for seed in args.seeds:
        print(f"seed {seed}: {args.curves} curves ...", file=sys.stderr, flush=True)
        res, ms = run(seed, args.curves, **kwargs)
        print(f"\nseed {seed}, {args.curves} curves, {ms:.1f} ms/curve")
        print(f"{'bucket':<26} {'transitions':>11} {'recall':>7} {'precision':>9} {'null':>5} {'false/null':>10}")
        for key in sorted(res, key=order):
            r = res[key]
            fmt = lambda v: "" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
            print(f"{key:<26} {r['transitions']:>11} {fmt(r['recall']):>7} {fmt(r['precision']):>9} "
                  f"{r['null_curves']:>5} {fmt(r['false_per_null']):>10}")


if __name__ == "__main__":
    main()
