"""Benchmark: scoring the heads of a 2-layer, 8-head model on 64 sequences of 128 tokens.

Target: < 1 s on CPU for the default ``induction_scores`` call. Timings are interleaved with a plain
forward pass of the same model on the same tokens (the baseline), so the ratio is meaningful on a
busy machine. Run:

    OMP_NUM_THREADS=1 python benchmarks/circuit_scoring.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from devinterp.analyses.circuits import induction_scores
from devinterp.data import repeated_tokens
from devinterp.models import AttentionOnlyTransformer

TARGET_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    V, T, N = args.vocab, 128, 64
    model = AttentionOnlyTransformer(V, n_layers=2, n_heads=8, d_model=args.d_model, n_ctx=T, seed=0).eval()
    tokens = repeated_tokens(V, T, N, seed=0)

    def forward():
        with torch.no_grad():
            model(tokens)

    cases = {
        "forward (baseline)": forward,
        "induction_scores(copying=False)": lambda: induction_scores(
            model, vocab_size=V, seq_len=T, num_sequences=N, copying=False),
        "induction_scores() [default: copying on 8 seqs]": lambda: induction_scores(
            model, vocab_size=V, seq_len=T, num_sequences=N),
        "induction_scores(copying_sequences=None)": lambda: induction_scores(
            model, vocab_size=V, seq_len=T, num_sequences=N, copying_sequences=None),
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():  # interleaved
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    base = statistics.median(times["forward (baseline)"])
    print(f"model: 2 layers x 8 heads, d_model={args.d_model}, vocab={V}; {N} sequences x {T} tokens; "
          f"threads={args.threads}; median of {args.repeats} (min-max); cpu = process CPU time "
          "(less sensitive to other jobs on a shared machine)")
    for name, ts in times.items():
        med, cmed = statistics.median(ts), statistics.median(cpu[name])
        print(f"{name:50s} wall {med:6.3f} s ({min(ts):.3f}-{max(ts):.3f})  cpu {cmed:6.3f} s  "
              f"x{med / base:5.1f} forward  {med / TARGET_S:5.2f} of the {TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
