"""The lean path's own buffers stay within (chains + 1) × the parameters, sequential or on
worker threads: every tensor the run allocates with at least half the parameters' elements is
tracked (a dispatch mode in every thread that runs chains) until it is freed."""

from __future__ import annotations

import threading
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from devinterp.analyses import parallel, sampling
from devinterp.analyses.sampling import prepare_target, sample_chains


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


def _peak(monkeypatch, lean_min_dim: int, workers: int) -> tuple[int, int, list[int]]:
    """Run 4 chains with two MALA checks; (peak tracked elements, D, sizes seen)."""
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
        traces = sample_chains(target, num_chains=4, num_steps=12, step_size=1e-3, seed=3,
                               workers=workers, backend="thread", check_every=4,
                               acceptance_steps=[3, 9])
    assert traces.workers == workers and traces.acceptance.shape == (2, 4)
    return ledger["peak"], dim, ledger["sizes"]


@pytest.mark.parametrize("workers", [1, 2])
def test_lean_path_holds_chains_plus_one_check_buffer(monkeypatch, workers):
    peak, dim, sizes = _peak(monkeypatch, 0, workers)
    # the chains' (C, D) rows once, and one (D,) buffer per MALA check of each chain
    assert sizes.count(4 * dim) == 1
    assert sizes.count(dim) == 2 * 4
    # parallel: a check runs alone (CheckGate), so check buffers never overlap
    assert peak <= (4 + 1) * dim, (peak / dim, sorted(set(sizes)))


def test_the_batched_path_exceeds_the_lean_bound(monkeypatch):
    """The same count on the batched path (its (C, D) gradient and noise buffers), which the
    lean path exists to avoid: the bound above is not vacuous."""
    peak, dim, _ = _peak(monkeypatch, 1 << 40, 1)
    assert peak > (4 + 2) * dim
