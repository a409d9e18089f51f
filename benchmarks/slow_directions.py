"""Slow directions of a deep linear network at its teacher: spectrum, prediction, long chains.

Builds the exact Hessian of L_n at w* (float64, the loss written through the input covariance,
which equals the data loss of a noise-free teacher), prints the eigenvalues of nβ·∇²L_n, the
Laplace value Σ½h/(h+γ), and the relaxation deficit the quadratic model predicts for chain plans
(``diagnostics.relaxation_deficit``). Then runs ``--chains`` full-batch chains from w* for
``--steps`` steps (SGLD, or MALA with ``--mala``: exact for the localized posterior) at
``ε = eps_h / h_max`` and prints λ̂ per window of steps (plain, and less the step-size correction
ε/8·∇(nβL)·∇U), then the variance of the chains along w*'s eigenvectors against the quadratic
equilibrium 1/(h + γ). docs/calibration.md, "Slow directions", was measured with

    OMP_NUM_THREADS=1 python benchmarks/slow_directions.py --widths 4,4,4,4,4,4 --rank 1 --seed 0 \
        --eps-h 0.5 --steps 50000 --chains 8              # ~10 min on one core
    ... --eps-h 1 --steps 30000 --chains 8 --mala         # stopped after 21,000 steps
    ... --widths 20,20,20,20,20,20 --rank 2 --seed 1 --lanczos 40,100   # matrix-free spectrum
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from devinterp.analyses import diagnostics as diag
from devinterp.analyses import relaxation
from devinterp.analyses.sampling import prepare_target
from devinterp.analyses.theory import make_dln_problem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="4,4,4,4,4,4")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--eps-h", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=0, help="0: spectrum and predictions only")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--mala", action="store_true")
    ap.add_argument("--lanczos", default="",
                    help="comma-separated Lanczos step counts: read the same predictions from "
                         "relaxation.lanczos_spectrum (what estimate_llc uses above 256 weights)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    widths = [int(w) for w in args.widths.split(",")]
    p = make_dln_problem(widths, args.rank, args.n, args.seed, noise_std=0.0)
    torch.set_default_dtype(torch.float64)  # after the problem: its teacher stays the same
    gamma, chains = args.gamma, args.chains
    shapes = [q.shape for q in p.model.parameters()]
    flat0 = torch.cat([q.detach().flatten().double() for q in p.model.parameters()])
    x = p.data[0].double()
    n = x.shape[0]
    cov = x.T @ x / n
    nb = n / math.log(n)

    def prod(v):  # (C, d) -> end-to-end matrices (C, out, in)
        i, out = 0, None
        for s in shapes:
            k = s.numel()
            w = v[:, i:i + k].view(-1, *s)
            i += k
            out = w if out is None else w @ out
        return out

    pstar = prod(flat0[None])[0]

    def loss(v):
        d = prod(v) - pstar
        return 0.5 * torch.einsum("cij,jk,cik->c", d, cov, d)

    hess = torch.autograd.functional.hessian(lambda v: loss(v[None])[0], flat0)
    ev, vecs = torch.linalg.eigh(hess * nb)
    ev = ev.clamp(min=0)
    hmax = ev.max().item() + gamma
    eps = args.eps_h / hmax
    laplace = 0.5 * (ev / (ev + gamma)).sum().item()
    print(f"{p.description}: exact λ {p.llc}, d {len(flat0)}, nβ {nb:.1f}, Laplace Σ½h/(h+γ) "
          f"{laplace:.3f}, h_max {hmax:.1f}, ε {eps:.3g} (ε·h_max {args.eps_h})")
    top = sorted(ev.tolist(), reverse=True)
    print("eigenvalues of nβ·∇²L_n(w*):", ", ".join(f"{h:.3g}" for h in top if h > 1e-6))
    h = ev.numpy()
    for c, total, eh in ((2, 1900, 0.5), (1, 3800, 0.5), (2, 1900, 1.0), (1, 3800, 1.0),
                         (2, 9000, 0.5), (2, 19000, 0.5)):
        e = eh / hmax
        d, _ = diag.relaxation_deficit(h, e, gamma, total // 2, total - total // 2)
        print(f"  predicted deficit, {c} × {total} steps at ε·h = {eh}: {d:.1%}"
              f" (λ̂ ≈ {laplace * (1 - d):.2f})")
    print(f"  steps per chain for a 5% deficit at ε·h = {args.eps_h}: "
          f"{diag.steps_to_relax(h, eps, gamma):,}")
    for k in [int(s) for s in args.lanczos.split(",") if s]:
        torch.set_default_dtype(torch.float32)
        target = prepare_target(p.model, p.data, p.loss_fn)
        for probe in range(3):
            nodes, weights = relaxation.lanczos_spectrum(target, num_steps=k, seed=probe)
            nodes = nodes * nb
            eq_l = float((weights * 0.5 * nodes.clip(0) / (nodes.clip(0) + gamma)).sum())
            reads = []
            for c, total, eh in ((2, 1900, 0.5), (1, 3800, 1.0)):
                e = eh / hmax
                d, _ = diag.relaxation_deficit(nodes, e, gamma, total // 2, total - total // 2,
                                               weights)
                reads.append(f"{c} × {total} at ε·h = {eh}: {d:.1%}")
            print(f"  Lanczos {k} steps ({2 * k} evaluations), probe seed {probe}: top "
                  f"{nodes.max():.4g}, Laplace {eq_l:.1f}; deficit " + ", ".join(reads))
        torch.set_default_dtype(torch.float64)
    if not args.steps:
        return
    gen = torch.Generator().manual_seed(args.seed)
    v = flat0[None].repeat(chains, 1).clone()
    win = args.steps // args.windows
    proj = []
    sum_p, sum_c, count, accepted = torch.zeros(chains), torch.zeros(chains), 0, 0.0
    t0 = time.time()
    for t in range(args.steps):
        v.requires_grad_(True)
        lv = loss(v)
        (grad,) = torch.autograd.grad(lv.sum(), v)
        v = v.detach()
        grad_u = nb * grad + gamma * (v - flat0)
        corr = eps / 8 * ((nb * grad) * grad_u).sum(1)
        sum_p += nb * lv.detach()
        sum_c += nb * lv.detach() - corr
        count += 1
        prop = v - eps / 2 * grad_u + math.sqrt(eps) * torch.randn(v.shape, generator=gen)
        if args.mala:
            u0 = nb * lv.detach() + gamma / 2 * (v - flat0).pow(2).sum(1)
            prop.requires_grad_(True)
            l1 = loss(prop)
            (g1,) = torch.autograd.grad(l1.sum(), prop)
            prop = prop.detach()
            grad_u1 = nb * g1 + gamma * (prop - flat0)
            u1 = nb * l1.detach() + gamma / 2 * (prop - flat0).pow(2).sum(1)
            log_fwd = -(prop - v + eps / 2 * grad_u).pow(2).sum(1) / (2 * eps)
            log_bwd = -(v - prop + eps / 2 * grad_u1).pow(2).sum(1) / (2 * eps)
            ok = torch.rand(chains, generator=gen).log() < u0 - u1 + log_bwd - log_fwd
            accepted += ok.double().mean().item()
            v = torch.where(ok[:, None], prop, v)
        else:
            v = prop
        if t % 10 == 0:
            proj.append(((v - flat0) @ vecs).clone())
        if (t + 1) % win == 0:
            acc = f", MALA acceptance so far {accepted / (t + 1):.3f}" if args.mala else ""
            print(f"steps {t + 1 - win}-{t + 1}: λ̂ plain {(sum_p / count).mean():.3f}, "
                  f"corrected {(sum_c / count).mean():.3f} ({time.time() - t0:.0f} s{acc})",
                  flush=True)
            sum_p.zero_()
            sum_c.zero_()
            count = 0
    proj = torch.stack(proj)
    steps = proj.shape[0]
    var_eq = 1 / (ev + gamma)
    print("nβ·μ | chains' variance along w*'s eigenvector / 1/(h+γ), in the steps 0-10%, 40-50%, "
          "90-100%")
    for j in torch.argsort(ev, descending=True)[:20].tolist():
        ratios = [proj[int(a * steps):int(b * steps), :, j].pow(2).mean().item()
                  / var_eq[j].item() for a, b in ((0, .1), (.4, .5), (.9, 1.))]
        print(f"{ev[j].item():10.2f} | " + " ".join(f"{r:9.3f}" for r in ratios))


if __name__ == "__main__":
    main()
