"""The lean path runs each worker's chains one after the other in one chain state, so its own
buffers stay within (workers + 1) × the parameters whatever the number of chains, sequential or
on worker threads: every tensor the run allocates with at least half the parameters' elements is
tracked (a dispatch mode in every thread that runs chains) until it is freed. The traces are
those of the chains advanced together (``run_chains`` with every chain), bit for bit."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from devinterp.analyses import parallel, sampling
from devinterp.analyses.sampling import (
    divergence_threshold,
    prepare_target,
    run_chains,
    sample_chains,
)


class BigTensors(TorchDispatchMode):
    """Counts the elements of live tensors with at least ``min_numel`` elements made by any
    op (shared by the threads that enter it); ``peak`` is the most alive at once."""

    def __init__(self, min_numel: int, ledger: dict):
        super().__init__()
        self.min_numel, self.ledger = min_numel, ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue  # in place or a view: no new memory
            n = t.untyped_storage().nbytes() // t.element_size()
            if n < self.min_numel:
                continue
            led = self.ledger
            with led["lock"]:
                led["live"] += n
                led["peak"] = max(led["peak"], led["live"])
                led["sizes"].append(n)
            weakref.finalize(t, _release, led, n)
        return out


def _release(ledger: dict, n: int) -> None:
    with ledger["lock"]:
        ledger["live"] -= n


def _deep_linear(width: int = 24, depth: int = 6, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    x = torch.randn(n, width, generator=g)
    y = torch.randn(n, width, generator=g)
    return model, (x, y)


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _peak(monkeypatch, lean_min_dim: int, workers: int, chains: int = 4
          ) -> tuple[int, int, list[int]]:
    """Run ``chains`` chains with two MALA checks; (peak tracked elements, D, sizes seen)."""
    monkeypatch.setattr(sampling, "LEAN_MIN_DIM", lean_min_dim)
    model, data = _deep_linear()
    target = prepare_target(model, data, _loss, batch_size=4)
    dim = target.dim
    ledger = {"lock": threading.Lock(), "live": 0, "peak": 0, "sizes": []}
    run_group = parallel._run_group

    def tracked(*args, **kwargs):  # the worker threads' ops (a dispatch mode is per thread)
        with BigTensors(dim // 2, ledger):
            return run_group(*args, **kwargs)

    monkeypatch.setattr(parallel, "_run_group", tracked)
    with BigTensors(dim // 2, ledger):
        traces = sample_chains(target, num_chains=chains, num_steps=12, step_size=1e-3, seed=3,
                               workers=workers, backend="thread", check_every=4,
                               acceptance_steps=[3, 9])
    assert traces.workers == workers and traces.acceptance.shape == (2, chains)
    return ledger["peak"], dim, ledger["sizes"]


@pytest.mark.parametrize("workers", [1, 2])
def test_lean_path_holds_one_chain_per_worker_plus_one_check_buffer(monkeypatch, workers):
    peaks = {}
    for chains in (4, 8):
        peak, dim, sizes = _peak(monkeypatch, 0, workers, chains)
        # one chain state (D,) per worker, and one (D,) buffer per MALA check of each chain;
        # nothing of C × D
        assert sizes.count(dim) == workers + 2 * chains, sorted(set(sizes))
        assert max(sizes) == dim
        # parallel: a check runs alone (CheckGate), so check buffers never overlap
        assert peak <= (workers + 1) * dim, (peak / dim, sorted(set(sizes)))
        peaks[chains] = peak
    assert peaks[8] == peaks[4]  # does not grow with the chains


def test_the_batched_path_exceeds_the_lean_bound(monkeypatch):
    """The same count on the batched path (its (C, D) gradient and noise buffers), which the
    lean path exists to avoid: the bound above is not vacuous."""
    peak, dim, _ = _peak(monkeypatch, 1 << 40, 1)
    assert peak > (4 + 2) * dim


def _lockstep(target, chains: int, steps: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Losses ``(C, T)`` and acceptance ``(checks, C)`` of the chains advanced together (the
    lean path's order before it ran them one after the other)."""
    losses, acc = [], []
    gen = run_chains(target, num_chains=chains, num_steps=steps, **kw)
    for _, _, info in gen:
        losses.append(info.loss.clone())
        if info.acceptance is not None:
            acc.append(info.acceptance.clone())
    target.release_buffers()
    return (torch.stack(losses, 1).numpy(),
            torch.stack(acc).numpy() if acc else np.zeros((0, chains), np.float32))


@pytest.mark.parametrize("workers,backend", [(1, None), (2, "thread"), (3, "process")])
def test_chains_one_after_the_other_equal_the_chains_together(monkeypatch, workers, backend):
    if backend == "process" and not parallel.fork_available():
        pytest.skip("no fork")
    monkeypatch.setattr(sampling, "LEAN_MIN_DIM", 0)
    model, data = _deep_linear(width=10, depth=4, seed=2)
    mask = {"1.weight": torch.rand(10, 10, generator=torch.Generator().manual_seed(5)) > 0.5}
    for params, batch in ((None, 8), (mask, 64)):  # minibatches; full batch with a mask
        target = prepare_target(model, data, _loss, batch_size=batch, params=params)
        kw = dict(step_size=2e-3, localization=3.0, nbeta=20.0, seed=11)
        ref_losses, ref_acc = _lockstep(target, 5, 23, acceptance_steps=[0, 7, 22], **kw)
        seen, done = [], []
        out = sample_chains(target, num_chains=5, num_steps=23, check_every=6,
                            acceptance_steps=[0, 7, 22], workers=workers, backend=backend,
                            on_progress=seen.append,
                            progress=lambda *a, done=done: done.append(a), **kw)
        assert out.workers == workers and out.final_params is None
        np.testing.assert_array_equal(out.losses, ref_losses)
        np.testing.assert_array_equal(out.acceptance, ref_acc)
        assert out.acceptance_steps == (0, 7, 22) and 0 < ref_acc.min() <= ref_acc.max() <= 1
        assert sum(seen) == 5 * (23 + 3)  # evaluations: chain-steps and checks
        # progress: chain-steps over chains, one report per chunk of one chain, up to the end
        assert len(done) == 5 * 4 and done == sorted(done) and done[-1] == (23, 23)
    # one chain alone ends where it ends among the others (masked entries never move)
    target = prepare_target(model, data, _loss, batch_size=8, params=mask)
    ends = []
    for ids in (None, [3]):
        states = [state for _, state, _ in run_chains(target, num_chains=5, num_steps=9,
                                                      chain_ids=ids, **kw)]
        ends.append(states[-1].params.clone())  # (a live view of the chains' buffer)
        target.release_buffers()
    assert torch.equal(ends[1][0], ends[0][3])
    off = target.mask == 0
    assert torch.equal(ends[0][:, off], target.anchor[off].expand(5, -1))


@pytest.mark.parametrize("workers,backend", [(1, None), (2, "thread"), (2, "process")])
def test_a_divergence_is_found_where_the_chains_together_find_it(monkeypatch, workers, backend):
    """The first divergence (earliest step, then lowest chain) and the trace up to it, although
    a chain that runs first may diverge later than one that runs after it."""
    if backend == "process" and not parallel.fork_available():
        pytest.skip("no fork")
    monkeypatch.setattr(sampling, "LEAN_MIN_DIM", 0)
    model, data = _deep_linear(width=10, depth=4, seed=1)
    target = prepare_target(model, data, _loss, batch_size=8)
    found = []
    for eps in (0.01, 0.05, 0.1, 0.2):
        kw = dict(step_size=eps, localization=1.0, nbeta=40.0, seed=2)
        losses, _ = _lockstep(target, 4, 60, **kw)
        bad = ~np.isfinite(losses) | (losses > divergence_threshold(target, 40.0))
        out = sample_chains(target, num_chains=4, num_steps=60, check_every=7,
                            on_divergence="stop", workers=workers, backend=backend, **kw)
        if not bad.any():
            assert not out.diverged
            continue
        step = int(np.where(bad.any(0))[0][0])
        chain = int(np.where(bad[:, step])[0][0])
        found.append(chain)
        assert (out.diverged_chain, out.diverged_step) == (chain, step)
        np.testing.assert_array_equal(out.losses, losses[:, :step])
    assert any(found)  # a case where a later chain diverges first (at 0.1)
