"""Benchmark: every weight-space circuit score of a 12-layer × 12-head model on one CPU thread.

"All scores" = Q-, K- and V-composition of every head pair (``composition_scores``), the OV
copying score of every head (``ov_copying_scores``) and the positional QK previous-token score
(``qk_previous_token_scores``). Target: < 1 s. Baseline, timed interleaved in the same run on the
same weights: TransformerLens' own ``composition_scores`` on ``FactoredMatrix`` circuits (what
``all_composition_scores`` calls) for Q, K and V, or, without TransformerLens, the dense
definition (explicit ``d_model × d_model`` products) in torch.

The cost is dominated by the pairwise products (``(L·H·d_head)² · d_model / 2`` multiply-adds per
kind) and by ``W_U W_E`` (``vocab · d_model²``) for copying, so the script reports several widths.

    OMP_NUM_THREADS=1 python benchmarks/composition_scoring.py [--d-model 192 384] [--vocab 4096]
    OMP_NUM_THREADS=1 python benchmarks/composition_scoring.py --d-model 768 --no-baseline   # GPT-2 small widths
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from devinterp.analyses.composition import (
    KINDS,
    composition_scores,
    ov_copying_scores,
    qk_previous_token_scores,
)
from devinterp.analyses.head_access import HeadWeights

TARGET_S = 1.0


def random_weights(L: int, H: int, d: int, vocab: int, n_ctx: int, seed: int = 0) -> HeadWeights:
    g = torch.Generator().manual_seed(seed)
    dh = d // H

    def r(*s):
        return torch.randn(*s, generator=g) / d ** 0.5

    return HeadWeights(W_Q=r(L, H, d, dh), W_K=r(L, H, d, dh), W_V=r(L, H, d, dh), W_O=r(L, H, dh, d),
                       b_Q=None, b_K=None, b_V=None, b_O=None, W_E=r(vocab, d), W_U=r(d, vocab),
                       W_pos=r(n_ctx, d), family="benchmark")


def ours(hw: HeadWeights) -> None:
    for kind in KINDS:
        composition_scores(hw, kind)
    ov_copying_scores(hw)
    qk_previous_token_scores(hw)


def baseline_fn(hw: HeadWeights):
    try:
        from transformer_lens.FactoredMatrix import FactoredMatrix
        from transformer_lens.utilities import composition_scores as tl_scores
    except ImportError:
        tl_scores = None

    if tl_scores is not None:
        def tl() -> None:
            left = FactoredMatrix(hw.W_V, hw.W_O)
            qk = FactoredMatrix(hw.W_Q, hw.W_K.transpose(-2, -1))
            for right in (qk, qk.T, left):
                tl_scores(left, right, broadcast_dims=True)
        return "TransformerLens composition_scores (Q, K, V)", tl

    def dense() -> None:
        ov = hw.W_V @ hw.W_O
        qk = hw.W_Q @ hw.W_K.transpose(-1, -2)
        L, H, d, _ = ov.shape
        left = ov.reshape(L * H, d, d)
        for right in (qk, qk.transpose(-1, -2), ov):
            right = right.reshape(L * H, d, d)
            for i in range(L * H):
                torch.linalg.matrix_norm(left[i] @ right)
    return "dense d_model x d_model products (Q, K, V)", dense


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): on a busy machine the CPU time is the cost itself."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, nargs="+", default=[192, 384])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.layers} layers x {args.heads} heads, vocab {args.vocab}, n_ctx {args.n_ctx}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    for d in args.d_model:
        hw = random_weights(args.layers, args.heads, d, args.vocab, args.n_ctx)
        name, base = baseline_fn(hw)
        ours(hw)  # warm-up
        t_ours, t_base = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(lambda hw=hw: ours(hw)))
            if not args.no_baseline:
                t_base.append(timed(base))
        mo = statistics.median(w for w, _ in t_ours)
        co = statistics.median(c for _, c in t_ours)
        line = f"d_model {d:4d} (d_head {d // args.heads}): all scores {mo:.3f} s wall, {co:.3f} s CPU " \
               f"[{'OK' if co < TARGET_S else 'over'} the {TARGET_S:.0f} s target]"
        if t_base:
            mb = statistics.median(w for w, _ in t_base)
            cb = statistics.median(c for _, c in t_base)
            line += f"; baseline ({name}) {mb:.3f} s wall, {cb:.3f} s CPU; ratio baseline/ours {cb / co:.1f}x (CPU)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
