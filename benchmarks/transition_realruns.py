"""Real-run check of the transition flags: replay demo runs' recorded curves through the tracker.

Usage: python benchmarks/transition_realruns.py RUN_DIR [RUN_DIR ...]   (folders of `devinterp demo`)

For each run, the curves the demo's TransitionCallback watched (loss, LLC with its stderr, ICL
score, induction scores, K-composition of each head pair) are read back from TensorBoard and
replayed through :class:`TransitionTracker` at the demo's check steps (``range_factor=40`` as in
the demo). Printed per flag: how far its curve moves across ``[start, end]`` as a fraction of its
range (:func:`relative_move`; ``TINY`` below 10%); per induction head (final score > 0.5): whether
its rise is flagged within x1.5 of the step where its score crosses half its final value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from devinterp.analyses.transitions import TransitionTracker, relative_move, replay
from devinterp.demo import half_crossing
from devinterp.tensorboard import read_scalars

HEADS = [f"L{layer}H{head}" for layer in range(2) for head in range(2)]


def curves_of(sc: dict) -> dict:
    """The watched curves, ``{metric: (steps, values, stderr or None)}``."""
    metrics = ["loss/train", "llc/mean", "icl_score", *(f"induction/{h}" for h in HEADS)]
    metrics += sorted(k for k in sc if k.startswith("composition/K/"))
    out = {}
    for m in metrics:
        if m not in sc:
            continue
        s, v = sc[m]
        e = None
        if m == "llc/mean" and "llc/stderr" in sc:
            err = dict(zip(*(a.tolist() for a in sc["llc/stderr"]), strict=True))
            e = np.array([err.get(x, np.nan) for x in s.tolist()])
            e = e if np.all(np.isfinite(e)) else None
        out[m] = (s, v, e)
    return out


def check(run: Path) -> tuple[int, int]:
    """Print the run's flags and formation check; return ``(tiny flags, formation misses)``."""
    sc = read_scalars(run / "tensorboard")
    cfg = json.loads((run / "summary.json").read_text())["config"]
    curves = curves_of(sc)
    checks = list(range(cfg["check_every"], cfg["steps"] + 1, cfg["check_every"]))
    if checks[-1] != cfg["steps"]:
        checks.append(cfg["steps"])
    flags = replay(curves, checks, TransitionTracker(range_factor=40.0))
    print(f"== {run} ({len(flags)} flags)")
    tiny = misses = 0
    for t in sorted(flags, key=lambda t: t.step):
        move = relative_move(curves[t.metric][0], curves[t.metric][1], t)
        tiny += move < 0.1
        print(f"  {t.metric:28s} {t.direction:4s} step {t.step:>6} [{t.start},{t.end}] w={t.width:.3f} "
              f"mag={t.magnitude:.1f} move={move:.2f}{'  TINY' if move < 0.1 else ''}")
    for h in HEADS:
        s, v = sc[f"induction/{h}"]
        if v[-1] <= 0.5:
            continue
        half = half_crossing(s, v)
        near = [t.step for t in flags if t.metric == f"induction/{h}" and t.direction == "rise"
                and half / 1.5 <= t.step <= half * 1.5]
        misses += not near
        print(f"  formation induction/{h}: half at {half}, flagged {near} {'OK' if near else 'MISSED'}")
    return tiny, misses


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    totals = np.array([check(Path(run)) for run in sys.argv[1:]]).sum(0)
    print(f"TOTAL tiny flags {totals[0]}, formation misses {totals[1]}")


if __name__ == "__main__":
    main()
