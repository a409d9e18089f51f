"""Chains on several cores or devices give the sequential run's numbers; the lean path's MALA
check matches the reference formula; the plan rule; errors from workers reach the caller."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

from devinterp.analyses import estimate_llc, parallel, sampling
from devinterp.analyses.sampling import prepare_target, run_chains, sample_chains
from devinterp.errors import ChainDivergedError, InvalidInputError
from devinterp.sgmcmc import mala


def _problem(seed: int = 0, n: int = 240):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3))
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, 3, generator=g)
    return model, (x, y)


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.fixture
def lean(monkeypatch):
    monkeypatch.setattr(sampling, "LEAN_MIN_DIM", 0)


@pytest.mark.parametrize("path", ["batched", "lean"])
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_parallel_chains_equal_the_sequential_run(path, backend, request):
    if path == "lean":
        request.getfixturevalue("lean")
    if backend == "process" and not parallel.fork_available():
        pytest.skip("no fork")
    model, data = _problem(seed=1)
    mask = {"0.weight": torch.rand(11, 6, generator=torch.Generator().manual_seed(2)) > 0.5}
    for params in (None, mask):
        target = prepare_target(model, data, _loss, batch_size=24, params=params)
        kw = dict(num_chains=5, num_steps=43, step_size=2e-3, seed=7, check_every=10,
                  acceptance_steps=[2, 30, 42])
        ref = sample_chains(target, workers=1, **kw)
        assert ref.workers == 1 and ref.backend == "inline"
        out = sample_chains(target, workers=2, backend=backend, **kw)
        assert out.workers == 2 and out.backend == backend
        np.testing.assert_array_equal(out.losses, ref.losses)
        np.testing.assert_array_equal(out.acceptance, ref.acceptance)
        assert out.acceptance_steps == ref.acceptance_steps == (2, 30, 42)
        if path == "lean":  # chains one after the other: their end points are not kept
            assert out.final_params is None and ref.final_params is None
            continue
        assert torch.equal(out.final_params, ref.final_params)
        assert (ref.final_params != target.anchor).any()
        if params is not None:  # unselected entries never move
            off = target.mask == 0
            assert torch.equal(ref.final_params[:, off], target.anchor[off].expand(5, -1))


def test_estimate_llc_same_with_workers(lean):
    model, data = _problem(seed=3)
    kw = dict(num_chains=3, num_draws=40, num_burnin=10, step_size=1e-3, batch_size=32, seed=5)
    a = estimate_llc(model, data, _loss, workers=1, **kw)
    b = estimate_llc(model, data, _loss, workers=3, **kw)
    assert a.mean == b.mean and a.per_chain == b.per_chain
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


def test_divergence_found_the_same_way_in_parallel():
    model, data = _problem(seed=4)
    target = prepare_target(model, data, _loss, batch_size=32)
    kw = dict(num_chains=4, num_steps=60, step_size=3.0, check_every=5, on_divergence="stop")
    ref = sample_chains(target, workers=1, **kw)
    out = sample_chains(target, workers=2, **kw)
    assert ref.diverged and (out.diverged_chain, out.diverged_step) == (ref.diverged_chain,
                                                                          ref.diverged_step)
    np.testing.assert_array_equal(out.losses, ref.losses)
    with pytest.raises(ChainDivergedError):
        sample_chains(target, workers=2, **dict(kw, on_divergence="raise"))


def test_lean_step_acceptance_matches_the_mala_formula(lean):
    model, data = _problem(seed=6, n=64)
    target = prepare_target(model, data, _loss)  # full batch: both evaluations see it all
    eps, gamma, nbeta = 2e-2, 2.0, 30.0  # acceptance well below 1
    gen = run_chains(target, num_chains=3, num_steps=1, step_size=eps, localization=gamma,
                     nbeta=nbeta, acceptance_steps=[0], seed=1)
    _, state, info = next(gen)
    gen.close()
    assert info.sampler_info is None  # the lean path ran
    new = state.params.clone()
    old = target.anchor.expand(3, -1).clone()
    target.release_buffers()
    g_old, l_old = target.grad_and_loss(old, target.leaves, True)
    g_old = g_old.clone()
    g_new, l_new = target.grad_and_loss(new, target.leaves, True)
    d_old = (old - target.anchor) * gamma + nbeta * g_old
    d_new = (new - target.anchor) * gamma + nbeta * g_new
    u_old = mala.potential(old, target.anchor, l_old, localization=gamma, nbeta=nbeta)
    u_new = mala.potential(new, target.anchor, l_new, localization=gamma, nbeta=nbeta)
    ref = mala.acceptance_probability(old, new, u_old, u_new, d_old, d_new, step_size=eps)
    assert 0.05 < float(ref.min()) < 0.99  # a non-trivial check
    torch.testing.assert_close(info.acceptance, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(info.loss, l_old)


class _Tied(nn.Module):
    """Two linear layers sharing one weight; ``unused``: plus a parameter the loss never reaches."""

    def __init__(self, unused: bool = False):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        if unused:
            self.unused = nn.Parameter(torch.randn(7))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_get_the_gradient_of_both_uses():
    torch.manual_seed(0)
    model = _Tied()
    x, y = torch.randn(50, 5), torch.randn(50, 5)
    target = prepare_target(model, (x, y), _loss, vectorize=False)
    grads, loss = target.grad_and_loss(target.anchor.expand(2, -1), target.leaves, True)
    model.zero_grad()
    _loss(model, (x, y)).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grads[0], ref)
    torch.testing.assert_close(grads[1], ref)


def test_plan_rule(monkeypatch):
    monkeypatch.setattr(parallel, "core_budget", lambda: 4)
    model, data = _problem()
    target = prepare_target(model, data, _loss, batch_size=32)
    quick = parallel.plan(target, num_chains=4, estimated_seconds=0.01, compiled=False)
    assert quick.workers == 1 and quick.backend == "inline"
    long = parallel.plan(target, num_chains=4, estimated_seconds=100.0, compiled=False)
    assert long.workers == 4 and long.threads == 1
    assert parallel.plan(target, num_chains=4, estimated_seconds=100.0, compiled=True).workers == 1
    forced = parallel.plan(target, num_chains=3, estimated_seconds=0.0, compiled=False,
                           workers=8, backend="thread")
    assert forced.groups == ((0,), (1,), (2,)) and forced.backend == "thread"
    assert forced.threads == 1
    monkeypatch.setattr(parallel, "core_budget", lambda: 1)  # OMP_NUM_THREADS=1: sequential
    assert parallel.plan(target, num_chains=4, estimated_seconds=100.0,
                         compiled=False).workers == 1
    assert parallel.split(7, 3) == ((0, 1), (2, 3, 4), (5, 6))
    tr = sample_chains(target, num_chains=2, num_steps=5, step_size=1e-4)
    assert tr.workers == 1  # a tiny run stays in this thread


def test_no_import_cycle_between_sampling_and_its_helpers():
    import ast
    import inspect

    from devinterp.analyses import compiled

    for module in (compiled, parallel):
        tree = ast.parse(inspect.getsource(module))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "devinterp.analyses.sampling" not in imported and "sampling" not in names


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "all"])
def test_bad_workers(bad):
    model, data = _problem()
    with pytest.raises(InvalidInputError, match="workers"):
        estimate_llc(model, data, _loss, step_size=1e-3, num_draws=5, workers=bad)


def test_bad_devices_and_backend():
    model, data = _problem()
    target = prepare_target(model, data, _loss)
    with pytest.raises(InvalidInputError, match="twice"):
        sample_chains(target, num_steps=3, step_size=1e-4, devices=["cpu", "cpu"])
    with pytest.raises(InvalidInputError, match="empty"):
        sample_chains(target, num_steps=3, step_size=1e-4, devices=[])
    with pytest.raises(InvalidInputError, match="backend"):
        sample_chains(target, num_steps=3, step_size=1e-4, workers=2, backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA"):
            sample_chains(target, num_steps=3, step_size=1e-4, devices=["cuda:0", "cuda:1"])


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_worker_errors_reach_the_caller(backend):
    if backend == "process" and not parallel.fork_available():
        pytest.skip("no fork")
    model, data = _problem()
    pid, main = os.getpid(), threading.main_thread()

    def loss(m, batch):
        if os.getpid() != pid or threading.current_thread() is not main:
            raise ValueError("boom in a worker")
        return _loss(m, batch)

    target = prepare_target(model, data, loss, batch_size=32)
    with pytest.raises((ValueError, RuntimeError), match="boom in a worker"):
        sample_chains(target, num_chains=2, num_steps=4, step_size=1e-4, workers=2,
                      backend=backend)
    # the target still works afterwards, in this thread
    assert sample_chains(target, num_chains=2, num_steps=4, step_size=1e-4).losses.shape == (2, 4)


def test_closing_early_stops_the_workers():
    model, data = _problem()
    target = prepare_target(model, data, _loss, batch_size=16)
    the_plan = parallel.plan(target, num_chains=2, estimated_seconds=0.0, compiled=False,
                             workers=2, backend="process")
    chunks = parallel.iter_chunks(run_chains, target, the_plan, num_steps=10_000, chunk=5,
                                  run_kwargs=dict(num_chains=2, step_size=1e-4,
                                                  localization=1.0, nbeta=10.0))
    first = next(chunks)
    assert (first.start, first.stop) == (0, 5) and first.losses.shape == (2, 5)
    chunks.close()  # terminates the children; returns promptly
    assert not [c for c in __import__("multiprocessing").active_children()
                if c.name.startswith("devinterp-chains")]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@cuda
def test_cuda_end_to_end_and_batched():
    model, data = _problem()
    r = estimate_llc(model, data, _loss, device="cuda", num_chains=4, num_draws=50,
                     num_burnin=10, step_size=1e-3, batch_size=32)
    assert r.config.device.startswith("cuda") and np.isfinite(r.mean)
    cpu = estimate_llc(model, data, _loss, device="cpu", num_chains=4, num_draws=50,
                       num_burnin=10, step_size=1e-3, batch_size=32)
    assert abs(r.mean - cpu.mean) < 5 * max(r.stderr, cpu.stderr)


@cuda
def test_cuda_lean_path(lean):
    model, data = _problem()
    target = prepare_target(model, data, _loss, batch_size=32, device="cuda", vectorize=False)
    tr = sample_chains(target, num_chains=3, num_steps=20, step_size=1e-3, acceptance_steps=[5])
    assert np.isfinite(tr.losses).all() and tr.acceptance.shape == (1, 3)
    assert tr.final_params is None  # the lean path keeps no (C, D) of end points


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_chains_spread_over_two_gpus():
    model, data = _problem()
    target = prepare_target(model, data, _loss, batch_size=32, device="cuda:0", vectorize=False)
    kw = dict(num_chains=4, num_steps=30, step_size=1e-3, seed=2)
    one = sample_chains(target, workers=1, **kw)
    two = sample_chains(target, devices=["cuda:0", "cuda:1"], **kw)
    assert two.workers == 2 and two.backend == "thread"
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_is_reported_per_chunk(workers):
    model, data = _problem()
    target = prepare_target(model, data, _loss, batch_size=32)
    seen = []
    sample_chains(target, num_chains=2, num_steps=23, step_size=1e-4, check_every=10,
                  workers=workers, backend="thread", progress=lambda done, total: seen.append(
                      (done, total)))
    assert seen == [(10, 23), (20, 23), (23, 23)]


def test_a_model_changed_after_preparation_is_refused():
    model, data = _problem()
    target = prepare_target(model, data, _loss, batch_size=32)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # e.g. training went on
    with pytest.raises(InvalidInputError, match="prepare the target again"):
        sample_chains(target, num_chains=2, num_steps=3, step_size=1e-4)


def test_lean_moves_follow_the_sgld_drift(lean):
    """One lean step is ``w* − ε/2·∇U(w*) + √ε·ξ``: two step sizes with the same noise give
    ∇U per coordinate, compared with the batched path's gradient, including tied weights (one
    move with the gradient of both uses), a parameter the loss never reaches (no gradient:
    only noise) and masked entries (never move)."""
    torch.manual_seed(3)
    model = _Tied(unused=True)
    x, y = torch.randn(64, 5), torch.randn(64, 5)
    mask = {"a.bias": torch.tensor([True, False, True, True, False])}
    for params in (None, {**{k: torch.ones_like(p, dtype=torch.bool)
                             for k, p in model.named_parameters()}, **mask}):
        target = prepare_target(model, (x, y), _loss, vectorize=False, params=params)
        eps, gamma, nbeta = (1e-3, 4e-3), 3.0, 20.0
        moved = []
        for e in eps:
            gen = run_chains(target, num_chains=2, num_steps=1, step_size=e, localization=gamma,
                             nbeta=nbeta, seed=4)
            _, state, info = next(gen)
            assert info.sampler_info is None  # the lean path ran
            moved.append(state.params.clone() - target.anchor)
            gen.close()
        r1, r2 = (e ** 0.5 for e in eps)
        drift = 2 * (r2 * moved[0] - r1 * moved[1]) / (r1 * r2 * (r2 - r1))
        noise = (moved[0] + eps[0] / 2 * drift) / r1
        target.release_buffers()
        grads, _ = target.grad_and_loss(target.anchor.expand(2, -1).clone(), target.leaves, True)
        expected = nbeta * grads * (1 if target.mask is None else target.mask)
        torch.testing.assert_close(drift, expected, rtol=1e-2, atol=2e-2)
        assert expected.abs().max() > 1  # a gradient worth checking
        unused = [s for s in target.slots if s.name == "unused"][0]
        assert (drift[:, unused.offset:unused.offset + unused.numel].abs() < 2e-2).all()
        live = noise if target.mask is None else noise[:, target.mask > 0]
        assert 0.7 < float(live.std()) < 1.3 and not torch.equal(live[0], live[1])
        if target.mask is not None:
            assert (moved[0][:, target.mask == 0] == 0).all()


@pytest.mark.parametrize("processes", [False, True])
def test_check_gate_runs_a_check_alone(processes):
    """While a check holds the gate no chain step runs; steps of several workers overlap."""
    import multiprocessing as mp
    import time

    if processes and not parallel.fork_available():
        pytest.skip("no fork")
    ctx = mp.get_context("fork")
    gate = parallel.CheckGate(3, processes=processes)
    # shared counters (fork-inherited, also fine for threads): steps in progress, the most
    # seen at once, checks that saw a step in progress
    inside, most, bad = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    start = ctx.Barrier(3)  # all workers begin together: a loaded machine starts them late

    def body(w: int) -> None:
        start.wait(timeout=60)
        for k in range(30):
            if (k + w) % 7 == 0:
                with gate.check():
                    bad.value += inside.value > 0
                    time.sleep(0.002)
            else:
                with gate.step():
                    with inside.get_lock():
                        inside.value += 1
                        most.value = max(most.value, inside.value)
                    time.sleep(0.002)
                    with inside.get_lock():
                        inside.value -= 1

    kind = ctx.Process if processes else threading.Thread
    workers = [kind(target=body, args=(w,)) for w in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert all(getattr(t, "exitcode", 0) == 0 and not t.is_alive() for t in workers)
    assert bad.value == 0 and most.value >= 2
