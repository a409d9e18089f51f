"""Benchmark: every weight-space circuit score of a 12-layer × 12-head model on one CPU thread.

"All scores" = what ``CircuitCallback(weights=True)`` computes per snapshot:
``weight_circuit_scalars`` — Q-, K- and V-composition of every head pair (9,504 pairs per kind
at 12 × 12), the random baseline per kind (its cache cleared before every run, so it is paid
for), the OV copying score of every head and the positional QK previous-token score. Target:
< 1 s of CPU time. Default shapes: d_model 192, 384 and 768 (GPT-2 small: d_head 64), vocab 50,257
with tied embeddings (``W_U = W_Eᵀ``), 1,024 positions; ``--untied`` draws ``W_U`` separately.

Tied ``W_U`` is the transposed view of ``W_E``, as ``head_weights`` returns it for a tied model.
Measured in the same run on the same weights (process CPU time, min of ``--repeats``):

- each score kind alone (composition Q, K, V alone and together; the baseline cold; OV copying;
  QK previous-token), and the total per call with the baseline cached (it depends only on the
  shapes, so a run pays for it once);
- **floor**: the multiply-adds of the routes taken (ideal counts) divided by this machine's best
  single-thread float32 rate, measured first on the shapes that dominate; and the one
  ``vocab × d_model²`` product ``W_U W_E`` that OV copying cannot avoid, timed alone;
- **previous**: the implementation before the Gram route (QR factors; composition from every
  ``d_head × d_head`` product ``A_i B_j``, one kind at a time; ``W_U W_E`` in full, ``W_O C W_V``
  in float64; random baseline from full-size Gaussians).
- ``--tl``: TransformerLens' ``composition_scores`` on ``FactoredMatrix`` circuits (what
  ``all_composition_scores`` calls) — it broadcasts all pairs at once (GBs at d_model 768), so only
  on request.

    OMP_NUM_THREADS=1 python benchmarks/composition_scoring.py          # d_model 192, 384, 768 (GPT-2 small)
    OMP_NUM_THREADS=1 python benchmarks/composition_scoring.py --d-model 768 --untied --no-previous
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from devinterp.analyses import composition as comp
from devinterp.analyses.head_access import HeadWeights

TARGET_S = 1.0


def random_weights(L: int, H: int, d: int, vocab: int, n_ctx: int, *, tied: bool = True,
                   seed: int = 0) -> HeadWeights:
    g = torch.Generator().manual_seed(seed)
    dh = d // H

    def r(*s):
        return torch.randn(*s, generator=g) / d ** 0.5

    W_E = r(vocab, d)
    return HeadWeights(W_Q=r(L, H, d, dh), W_K=r(L, H, d, dh), W_V=r(L, H, d, dh), W_O=r(L, H, dh, d),
                       b_Q=None, b_K=None, b_V=None, b_O=None, W_E=W_E,
                       W_U=W_E.T if tied else r(d, vocab), W_pos=r(n_ctx, d), family="benchmark")


def ours(hw: HeadWeights) -> dict[str, float]:
    comp._baseline.cache_clear()
    return comp.weight_circuit_scalars(hw)


def _qr_r(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(W, mode="r").R


def previous(hw: HeadWeights) -> None:
    """The implementation before this benchmark's target was met (kept here to measure against)."""
    for kind in comp.KINDS:
        A = _qr_r(hw.W_V) @ hw.W_O
        X, Y = {"Q": (hw.W_Q, hw.W_K), "K": (hw.W_K, hw.W_Q), "V": (hw.W_V, hw.W_O.mT)}[kind]
        B = X @ _qr_r(Y).mT
        comp._pair_scores(A, [B], route="cross")
        _previous_baseline(hw.d_model, hw.d_head, kind)
    C = (hw.W_U @ hw.W_E).double()
    torch.linalg.eigvals(hw.W_O.double() @ C @ hw.W_V.double())
    comp.qk_previous_token_scores(hw)


def _previous_baseline(d: int, dh: int, kind: str, n: int = 64, seed: int = 0) -> float:
    """The previous random baseline: full-size Gaussian matrices, one kind at a time."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(n, *shape, generator=gen, dtype=torch.float64)

    A = _qr_r(draw(d, dh)) @ draw(dh, d)
    X, Y = draw(d, dh), draw(d, dh) if kind != "V" else draw(dh, d).mT
    B = X @ _qr_r(Y).mT
    return float((torch.linalg.matrix_norm(A @ B) / torch.linalg.matrix_norm(A)
                  / torch.linalg.matrix_norm(B)).mean())


def floor(hw: HeadWeights) -> None:
    comp._unembed_embed(hw.W_U, hw.W_E)


def parts(hw: HeadWeights, repeats: int) -> dict[str, float]:
    """Min CPU seconds of each score kind computed alone."""
    def bl():
        comp._baseline.cache_clear()
        return [comp.composition_baseline(hw, k) for k in "QKV"]

    fns = {**{f"composition {k}": (lambda k=k: comp.composition_scores(hw, k)) for k in comp.KINDS},
           "composition Q+K+V": lambda: comp.composition_scores_by_kind(hw),
           "baseline (cold)": bl,
           "OV copying": lambda: comp.ov_copying_scores(hw),
           "QK previous-token": lambda: comp.qk_previous_token_scores(hw)}
    return {name: min(timed(fn)[1] for _ in range(repeats)) for name, fn in fns.items()}


def macs(hw: HeadWeights, tied: bool, T: int = comp.QK_POSITIONS) -> dict[str, float]:
    """Multiply-adds of the routes taken (ideal counts: symmetric halves, no block waste)."""
    L, H, d, dh, V = hw.n_layers, hw.n_heads, hw.d_model, hw.d_head, hw.W_E.shape[0]
    n, pairs, D = (L - 1) * H, L * (L - 1) // 2 * H * H, d * (d + 1) // 2
    return {"composition: whitening (4 sides)": 4 * L * H * 2 * d * dh * dh,
            "composition: Gram formation (4 sides)": 4 * n * dh * D,
            "composition: Gram inner products (3 kinds)": 3 * pairs * D,
            "OV copying: W_U W_E": V * (D if tied else d * d),
            "OV copying: W_O (W_U W_E) W_V": L * H * dh * d * (d + dh),
            "QK previous-token": L * H * dh * d * (2 * T - 1) + L * H * dh * (T - 1) * T}


def gemm_rate(repeats: int) -> dict[str, float]:
    """This machine's single-thread float32 multiply rate (GMAC/s, best of ``repeats``) on our shapes."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, (m, k, n) in {"768 x 768 x 768": (768, 768, 768), "768 x 50257 x 768 (W_Eᵀ W_E)": (768, 50257, 768),
                            "9216 x 768 x 768 (W_O C)": (9216, 768, 768),
                            "132 x 9216 x 396 (inner products)": (132, 9216, 396)}.items():
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        out[name] = m * k * n / min(timed(lambda a=a, b=b: a @ b)[1] for _ in range(repeats)) / 1e9
    return out


def tl_fn(hw: HeadWeights):
    from transformer_lens.FactoredMatrix import FactoredMatrix
    from transformer_lens.utilities import composition_scores as tl_scores

    def tl() -> None:
        left = FactoredMatrix(hw.W_V, hw.W_O)
        qk = FactoredMatrix(hw.W_Q, hw.W_K.transpose(-2, -1))
        for right in (qk, qk.T, left):
            tl_scores(left, right, broadcast_dims=True)
    return tl


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
    parser.add_argument("--d-model", type=int, nargs="+", default=[192, 384, 768])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--untied", action="store_true", help="W_U drawn apart from W_E (default: tied)")
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--no-previous", action="store_true", help="skip the previous implementation")
    parser.add_argument("--tl", action="store_true", help="also time TransformerLens (memory-hungry)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.layers} layers x {args.heads} heads, vocab {args.vocab} "
          f"({'untied' if args.untied else 'tied'} W_U), n_ctx {args.n_ctx}, {args.threads} thread(s), "
          f"min of {args.repeats}; times are process CPU seconds (wall in brackets); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rates = gemm_rate(args.repeats)
    print("  float32 multiply rate: " + ", ".join(f"{k} {v:.1f} GMAC/s" for k, v in rates.items()), flush=True)
    peak = max(rates.values())
    for d in args.d_model:
        hw = random_weights(args.layers, args.heads, d, args.vocab, args.n_ctx, tied=not args.untied)
        n = len(ours(hw))  # warm-up
        rows = {"ours": [], "previous": [], "floor": [], "tl": []}
        fns = {"ours": lambda hw=hw: ours(hw), "floor": lambda hw=hw: floor(hw)}
        if not args.no_previous:
            fns["previous"] = lambda hw=hw: previous(hw)
        if args.tl:
            fns["tl"] = tl_fn(hw)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                rows[name].append(timed(fn))
        best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in rows.items() if v}
        wo, co = best["ours"]
        part = parts(hw, args.repeats)
        per_call = co - part["baseline (cold)"]
        print(f"d_model {d} (d_head {d // args.heads}): all {n} scores {co:.3f} s CPU ({wo:.3f} s wall) "
              f"[{'MET' if co < TARGET_S else 'OVER'}: target {TARGET_S:.0f} s]; per call with the "
              f"baseline cached (as in a run after its first snapshot) {per_call:.3f} s "
              f"[{'MET' if per_call < TARGET_S else 'OVER'}]", flush=True)
        print("  per kind: " + ", ".join(f"{k} {v:.3f} s" for k, v in part.items()), flush=True)
        count = macs(hw, tied=not args.untied)
        total = sum(count.values())
        print("  multiply-adds: " + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in count.items())
              + f"; total {total / 1e9:.1f} G = {total / peak / 1e9:.3f} s at the best rate above "
              f"({peak:.1f} GMAC/s): the floor of these routes on this CPU", flush=True)
        wf, cf = best["floor"]
        print(f"  W_U W_E alone: {cf:.3f} s CPU ({wf:.3f} s wall); all but it: {co - cf:.3f} s", flush=True)
        if "previous" in best:
            wp, cp = best["previous"]
            print(f"  previous implementation: {cp:.3f} s CPU ({wp:.3f} s wall); ratio previous/ours "
                  f"{cp / co:.1f}x", flush=True)
        if "tl" in best:
            wt, ct = best["tl"]
            print(f"  TransformerLens composition_scores (Q, K, V only): {ct:.3f} s CPU ({wt:.3f} s wall); "
                  f"ratio TL/ours {ct / co:.1f}x", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
