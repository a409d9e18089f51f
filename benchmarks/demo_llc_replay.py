"""Replay the demo's LLC estimates on its snapshots at given settings and print their diagnostics.

For choosing settings that hold across a run: each snapshot of a ``devinterp demo`` store is
loaded into the demo's model and estimated with ``estimate_llc`` on the demo's own LLC data
(``InductionLM.devinterp_data``) at the settings given (2 chains, γ = 100, batch 16, seed 0
unless overridden), printing λ̂ ± stderr, R-hat, ESS, MALA acceptance, the trend z and the
estimator's warnings. The number of estimates that warn is printed at the end.

    OMP_NUM_THREADS=1 python benchmarks/demo_llc_replay.py runs/demo/snapshots \\
        --set step_size=1.08e-3 --set num_burnin=60 --set num_draws=60 --steps 0,11,29,111,306,600
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="the demo's snapshot folder (DIR/snapshots)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an estimate_llc argument (JSON value), e.g. step_size=1e-3")
    ap.add_argument("--steps", default="", help="comma-separated snapshot steps (default: all)")
    args = ap.parse_args()
    from devinterp.analyses import estimate_llc
    from devinterp.demo import InductionLM, token_loss
    from devinterp.store import SnapshotStore

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    store = SnapshotStore(args.store)
    hp = store.run_info()["hparams"]
    module = InductionLM(hp["recipe"], seed=hp["seed"], llc_samples=hp["llc_samples"])
    data = module.devinterp_data()
    kw = dict(num_chains=2, localization=100.0, batch_size=16, seed=0, progress=False)
    for item in args.set:
        key, _, value = item.partition("=")
        kw[key] = json.loads(value)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else store.steps()
    print(f"{args.store}: {len(steps)} snapshots, n = {len(data)}, {kw}")
    warned = 0
    for step in steps:
        store.load_into(module, step)
        t0 = time.perf_counter()
        r = estimate_llc(module.model, (data,), token_loss, **kw)
        d = r.diagnostics
        warned += bool(r.warnings)
        print(f"step {step:5d}  λ̂ {r.mean:7.2f} ± {r.stderr:5.2f}  R-hat {d.rhat:.2f}  "
              f"ESS {d.ess:5.1f}  acceptance {d.acceptance:.3f}  trend z {d.trend_z:5.1f}  "
              f"{time.perf_counter() - t0:4.1f} s  " + " | ".join(w.split(":")[0] for w in r.warnings),
              flush=True)
    print(f"{warned} of {len(steps)} estimates carry warnings")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
