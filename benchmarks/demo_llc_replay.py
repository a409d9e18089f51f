"""Replay the demo's LLC estimates on its snapshots at given settings and print their diagnostics.

For choosing settings that hold across a run: each snapshot of a ``devinterp demo`` store is
loaded into the demo's model and estimated with ``estimate_llc`` on the demo's own LLC data
(``InductionLM.devinterp_data``) at the settings given (2 chains, γ = 100, batch 16, seed 0
unless overridden), printing λ̂ ± stderr, R-hat, ESS, MALA acceptance, the trend z and the
estimator's warnings. The number of estimates that warn is printed at the end.

    OMP_NUM_THREADS=1 python benchmarks/demo_llc_replay.py runs/demo/snapshots \\
        --set step_size=1.08e-3 --set num_burnin=60 --set num_draws=60 --steps 0,11,29,111,306,600

``--calibrate-at S`` replays what ``LLCCallback`` does in the demo instead: it calibrates once
on the snapshot at step S (the first stored step >= S) with the LLC settings the run recorded
(``run.json``'s ``llc``, its ``calibrate_kwargs`` overridden by ``--cal KEY=VALUE``, e.g.
``--cal min_acceptance=0.7``), and estimates every snapshot with that calibration (the step-size
correction applied, the reuse check on: the warnings include "the reused calibration ... may no
longer fit"). With ``--recalibrate`` a snapshot after S whose estimate shows the calibration no
longer fits is calibrated again and re-estimated, as ``LLCCallback(recalibrate=True)`` does
(printed as "recalibrated"; below the acceptance band only smaller step sizes are tried,
``refit_step_sizes``); the count of recalibrations is printed at the end. The snapshots before
S (the callback's deferred estimates) get the same treatment: an acceptance below the band there
is estimated again at the next smaller step size (``refit_step_sizes``, the lengths kept), any
other misfit calibrated again on that snapshot, and the result serves the later snapshots before S
only (the one made at S is restored for S and after). And an estimate whose chains are too short (R-hat, ESS, a trend)
is made again with twice the burn-in and draws within the budget (``max_extensions``; printed as
"longer").

    OMP_NUM_THREADS=1 python benchmarks/demo_llc_replay.py runs/demo/snapshots \\
        --calibrate-at 500 --cal min_acceptance=0.7 --recalibrate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings

import torch


def _pairs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="the demo's snapshot folder (DIR/snapshots)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an estimate_llc argument (JSON value), e.g. step_size=1e-3")
    ap.add_argument("--steps", default="", help="comma-separated snapshot steps (default: all)")
    ap.add_argument("--calibrate-at", type=int, default=None, metavar="S",
                    help="calibrate once at the first snapshot >= S with the run's recorded LLC "
                         "settings and reuse it for every estimate (as the demo's LLCCallback)")
    ap.add_argument("--cal", action="append", default=[], metavar="KEY=VALUE",
                    help="with --calibrate-at: a calibrate argument overriding the run's")
    ap.add_argument("--recalibrate", action="store_true",
                    help="with --calibrate-at: calibrate again where the reused calibration no "
                         "longer fits a later snapshot (LLCCallback(recalibrate=True))")
    ap.add_argument("--max-recalibrations", type=int, default=3, metavar="N",
                    help="with --recalibrate: at most N (LLCCallback's max_recalibrations)")
    ap.add_argument("--max-extensions", type=int, default=3, metavar="N",
                    help="with --recalibrate: at most N estimates made again with longer chains "
                         "(LLCCallback's max_extensions)")
    ap.add_argument("--quick", action="store_true",
                    help="with --calibrate-at, for a run that recorded no LLC settings: use the "
                         "quick demo's (default: the default demo's)")
    args = ap.parse_args()
    from devinterp.analyses import calibrate, estimate_llc
    from devinterp.analyses.budget import DEFAULT_BUDGET
    from devinterp.analyses.calibration import refit_step_sizes, reuse_signs
    from devinterp.analyses.llc import longer_chains
    from devinterp.demo import InductionLM, demo_config, demo_llc_settings, token_loss
    from devinterp.store import SnapshotStore

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    store = SnapshotStore(args.store)
    hp = store.run_info()["hparams"]
    module = InductionLM(hp["recipe"], seed=hp["seed"], llc_samples=hp["llc_samples"])
    data = module.devinterp_data()
    steps = [int(s) for s in args.steps.split(",")] if args.steps else store.steps()
    if args.calibrate_at is None:
        kw = dict(num_chains=2, localization=100.0, batch_size=16, seed=0, progress=False)
        cal_kw: dict = {}
    else:  # the callback's settings: the recorded ones, chain lengths from the calibration
        llc = dict(hp.get("llc") or demo_llc_settings(demo_config(quick=args.quick)))
        cal_kw = {**llc.pop("calibrate_kwargs", {}), **_pairs(args.cal)}
        kw = {k: v for k, v in llc.items() if k not in ("num_draws", "num_burnin")}
        kw.update(seed=hp["seed"], progress=False, expected_calls=len(steps))
    kw.update(_pairs(args.set))
    print(f"{args.store}: {len(steps)} snapshots, n = {len(data)}, {kw}")

    def new_calibration(step: int, grid: list[float] | None = None):
        store.load_into(module, step)
        t0 = time.perf_counter()
        c = calibrate(module.model, (data,), token_loss,
                      **{**{k: v for k, v in kw.items() if k not in ("num_acceptance_checks",
                                                                    "expected_calls")},
                         **cal_kw, **({} if grid is None else {"step_sizes": grid})})
        row = c.chosen_row()
        print(f"calibrated at step {step}: step_size={c.step_size:.3g} (pilot acceptance "
              f"{row.acceptance if row else float('nan'):.3f}), {c.num_chains} × "
              f"({c.num_burnin} + {c.num_draws}), ok={c.ok}, {c.cost:,} evaluations, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        return c

    state = {"cal": None, "at": None, "recalibrations": 0, "extensions": 0, "main": None}

    def longer(r, cal):
        """Twice the chain lengths where they were too short (LLCCallback._longer), or None."""
        if not (args.recalibrate and cal is not None and state["extensions"] < args.max_extensions
                and "num_draws" not in kw and "num_burnin" not in kw):
            return None
        return longer_chains(r, kw.get("budget", DEFAULT_BUDGET))

    def estimate(step: int, fresh: bool = False):
        """The estimate at ``step`` and why it was recalibrated (LLCCallback's rules)."""
        store.load_into(module, step)
        cal = state["cal"]
        r = estimate_llc(module.model, (data,), token_loss, **kw,
                         **({} if cal is None else {"calibration": cal}))
        tags = []
        while (args.recalibrate and cal is not None
               and state["recalibrations"] < args.max_recalibrations
               and (step > state["at"] or step == state["at"] and (fresh or tags)
                    or state["main"] is not None)
               and reuse_signs(r, cal)):
            grid = refit_step_sizes(r, cal, cal_kw.get("step_sizes"))
            if grid is None and step == state["at"]:
                break  # on the usual grid, this snapshot's calibration would come again
            tags.append("; ".join(reuse_signs(r, cal)) + f", λ̂ {r.mean:.2f}")
            if grid is not None and state["main"] is not None:  # deferred: the next smaller ε
                cal = state["cal"] = dataclasses.replace(cal, step_size=grid[0])
                print(f"step size refit at step {step}: {grid[0]:.3g}", flush=True)
            else:
                cal = state["cal"] = new_calibration(step, grid)
            state["at"] = step
            state["recalibrations"] += 1
            store.load_into(module, step)
            r = estimate_llc(module.model, (data,), token_loss, **kw, calibration=cal)
        more = longer(r, cal)
        if more is not None:
            state["extensions"] += 1
            tags.append(f"longer: R-hat {r.diagnostics.rhat:.2f}, ESS {r.diagnostics.ess:.0f}, "
                        f"λ̂ {r.mean:.2f}")
            store.load_into(module, step)
            r = estimate_llc(module.model, (data,), token_loss, **{**kw, **more},
                             **({} if cal is None else {"calibration": cal}))
        return r, tags

    held = {}
    if args.calibrate_at is not None:
        later = [s for s in store.steps() if s >= args.calibrate_at]
        if not later:
            raise SystemExit(f"no snapshot at or after step {args.calibrate_at}")
        state["at"] = later[0]
        state["cal"] = new_calibration(later[0])
        # the calibration's own snapshot first, as the callback does before the deferred ones
        t0 = time.perf_counter()
        held[later[0]] = (*estimate(later[0], fresh=True), time.perf_counter() - t0)
    warned = 0
    for step in steps:
        t0 = time.perf_counter()
        if state["at"] is not None:  # the snapshots before S: LLCCallback's deferred estimates
            if step < later[0] and state["main"] is None:
                state["main"] = (state["cal"], state["at"])
            elif step >= later[0] and state["main"] is not None:
                state["cal"], state["at"] = state["main"]
                state["main"] = None
        r, tags, seconds = held[step] if step in held else (*estimate(step), None)
        seconds = time.perf_counter() - t0 if seconds is None else seconds
        d = r.diagnostics
        warned += bool(r.warnings)
        print(f"step {step:5d}  λ̂ {r.mean:7.2f} ± {r.stderr:5.2f}  R-hat {d.rhat:.2f}  "
              f"ESS {d.ess:5.1f}  acceptance {d.acceptance:.3f}  trend z {d.trend_z:5.1f}  "
              f"ε {r.config.step_size:.3g}  {seconds:4.1f} s  "
              + " | ".join(w.split(":")[0] for w in r.warnings)
              + "".join(f"  recalibrated ({t})" for t in tags), flush=True)
    recalibrations = state["recalibrations"]
    print(f"{warned} of {len(steps)} estimates carry warnings"
          + (f"; {recalibrations} recalibration(s), {state['extensions']} longer estimate(s)"
             if args.recalibrate else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
