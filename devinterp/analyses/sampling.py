"""Run SGMCMC chains on a model's loss: the bridge between a model and the pure kernels.

Two layers, both public so that calibration can run many short pilot chains cheaply:

- :func:`prepare_target` validates the inputs once and holds everything that does not depend on
  the sampler's hyper-parameters: the data on the device, the selected parameters as one flat
  vector ``w*`` (plus a mask for entry-level selections), the full-data loss ``L_n(w*)`` and the
  gradient function (all chains advanced together with ``torch.func.vmap``, or one model copy per
  chain; picked by a quick timing probe and cached per model structure).
- :func:`run_chains` yields ``(step, state, info)`` for every step of every chain together;
  :func:`sample_chains` records the loss traces, checks for divergence and estimates the MALA
  acceptance on a few steps.

Each chain has its own ``torch.Generator`` for its noise and another for its minibatch order.
Noise and minibatch indices are drawn ahead in chunks (a few MB) so a step costs only the gradient
and a handful of tensor operations on a ``(chains, D)`` buffer.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Dataset, TensorDataset

from devinterp.analyses import compiled as _compiled
from devinterp.analyses import parallel as _parallel
from devinterp.errors import ChainDivergedError, InvalidInputError
from devinterp.sgmcmc import SAMPLERS, mala, sgld

LossFn = Callable[[nn.Module, Any], Tensor]
ParamSelection = (
    str | Sequence[str] | Callable[[str, nn.Parameter], bool] | Mapping[str, Tensor] | None
)

#: Noise and minibatch indices drawn ahead per chunk, in elements (4 MB of float32: small
#: enough to stay in cache on CPU).
_CHUNK_ELEMENTS = 2**20
_MAX_CHUNK_STEPS = 256
#: Explosion threshold: a loss above ``L(w*) + EXPLODE_FACTOR * scale`` counts as diverged.
EXPLODE_FACTOR = 1e3
#: ``(model structure, data shapes, chains, device) -> "vmap" | "loop"`` decided by a probe.
_MODE_CACHE: dict[tuple, str] = {}
#: From this many sampled coordinates on, SGLD in loop mode runs *lean*: each chain's forward,
#: backward and update in turn, in place, each parameter tensor updated as soon as its gradient
#: has been accumulated (a post-accumulate-grad hook) and its gradient freed, so no ``(D,)``
#: gradient buffer exists; a MALA acceptance check uses one ``(D,)`` buffer made for it (in a
#: parallel run the check runs alone: :class:`devinterp.analyses.parallel.CheckGate`).
#: :func:`sample_chains` runs each worker's chains one after the other in one chain state
#: (:func:`devinterp.analyses.parallel.group_chunks`), so the extra memory is one D per
#: worker plus at most one D for a check, whatever the number of chains, instead of several
#: (C, D) temporaries per step. Below it the chains share one backward pass (less autograd
#: overhead).
LEAN_MIN_DIM = 1 << 20
#: When one chain's forward pass saves at least this many bytes of activations for its backward
#: pass (measured once per target, on the first step), the loop mode (below ``LEAN_MIN_DIM``)
#: runs each chain's backward pass right after its forward pass instead of one backward pass
#: for the sum of all chains' losses: only one chain's activations exist at a time (a smaller
#: working set, far fewer fresh pages from the allocator: 1554 → 62 page faults and ~6% less
#: CPU per chain-step on the 206k-parameter transformer of ``benchmarks/llc_throughput.py
#: --step-cpu``, 17 MB of activations per chain). Small activations keep the shared pass (the
#: 784-128-128-10 MLP at batch 256, 1.3 MB: ~5% slower with one pass per chain). The gradients
#: are the same numbers either way (each chain's loss enters the sum with weight 1).
PER_CHAIN_BACKWARD_MIN_BYTES = 4 << 20
#: A gradient probe (:meth:`SamplingTarget.gradient_seconds`) that takes this long is not
#: repeated (the probe decides only whether parallel workers pay: an order of magnitude).
_PROBE_ONCE_SECONDS = 0.02
#: A gradient costs about this many forward passes (forward + backward ≈ 3 forwards): the
#: estimate :meth:`SamplingTarget.gradient_seconds` makes from the timed evaluation of L(w*)
#: for targets of the lean path's size, instead of timing a gradient.
_GRADIENT_FORWARDS = 3.0


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class _MappingSpec(NamedTuple):
    """Treespec of a mapping type that ``torch.utils._pytree`` does not know (HF ``BatchEncoding``)."""

    cls: type
    inner: Any


def _flatten(obj: Any) -> tuple[list[Any], Any]:
    if isinstance(obj, Mapping) and type(obj) not in pytree.SUPPORTED_NODES:
        leaves, inner = pytree.tree_flatten(dict(obj))
        return leaves, _MappingSpec(type(obj), inner)
    return pytree.tree_flatten(obj)


def _unflatten(leaves: list[Tensor], spec: Any) -> Any:
    """The batch, with the structure the data yields (the inverse of :func:`_flatten`)."""
    if isinstance(spec, _MappingSpec):
        return spec.cls(pytree.tree_unflatten(leaves, spec.inner))
    return pytree.tree_unflatten(leaves, spec)


def _is_rows(data: Any) -> bool:
    """A list of samples (dicts) rather than a list of tensors: a dataset of rows."""
    return isinstance(data, list) and bool(data) and all(isinstance(x, Mapping) for x in data)


def _materialize(data: Any) -> tuple[list[Tensor], Any, int | None]:
    """Turn data into leaves + treespec (+ loader batch size); the batch keeps the data's structure.

    A tensor is a dataset of its rows (batches are tensors), a tuple/list/dict of tensors a dataset
    of their rows (batches of the same structure), a Dataset (or a list of samples) is collated as
    a DataLoader would (``default_collate``), a DataLoader stands for its dataset.
    """
    loader_batch = None
    if isinstance(data, DataLoader):
        loader_batch = data.batch_size
        data = data.dataset
    if isinstance(data, TensorDataset):
        data = tuple(data.tensors)
    if _is_rows(data) or (not isinstance(data, (Tensor, tuple, list, Mapping, Dataset))
                          and hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        data = _RowsDataset(data)  # e.g. a list of dicts, a HuggingFace datasets.Dataset
    if isinstance(data, Tensor):
        leaves, spec = pytree.tree_flatten(data)
    elif isinstance(data, (tuple, list, Mapping)) and not isinstance(data, Dataset):
        leaves, spec = _flatten(data)
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise InvalidInputError(
                "data given as a tuple/list/dict must hold tensors with the samples along the "
                f"first dimension; got {type(data).__name__} with leaves "
                f"{[type(t).__name__ for t in leaves]}"
            )
    elif isinstance(data, Dataset):
        try:
            size = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidInputError(
                "data must have a length (a map-style Dataset); iterable datasets are not "
                "supported: collect the samples into tensors first"
            ) from None
        if size == 0:
            raise InvalidInputError("data is empty: it holds 0 samples")
        from torch.utils.data import default_collate

        batch = default_collate([data[i] for i in range(size)])
        leaves, spec = _flatten(batch)
    else:
        raise InvalidInputError(
            "data must be a tensor, a Dataset, a DataLoader or a tuple/dict of tensors, got "
            f"{type(data).__name__}"
        )
    leaves = [t if isinstance(t, Tensor) else torch.as_tensor(t) for t in leaves]
    if any(t.dim() == 0 for t in leaves):
        raise InvalidInputError("every data tensor needs a sample dimension (got a 0-d tensor)")
    sizes = {t.shape[0] for t in leaves}
    if len(sizes) != 1:
        raise InvalidInputError(
            f"data tensors disagree on the number of samples (first dimension): {sorted(sizes)}"
        )
    if sizes.pop() == 0:
        raise InvalidInputError("data is empty: it holds 0 samples")
    return leaves, spec, loader_batch


class _RowsDataset(Dataset):
    """A map-style view of anything with ``len`` and integer indexing."""

    def __init__(self, rows: Any):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.rows[i]


# --------------------------------------------------------------------------------------------
# parameter selection
# --------------------------------------------------------------------------------------------
def _select(model: nn.Module, params: ParamSelection) -> dict[str, Tensor | None]:
    """Return ``name -> entry mask or None (whole tensor)`` for the sampled parameters."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k: None for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise InvalidInputError(
                "the model has no trainable parameters (all requires_grad=False); pass "
                "params=... to choose which ones to sample"
            )
        return chosen
    if isinstance(params, Mapping):
        out: dict[str, Tensor | None] = {}
        for name, mask in params.items():
            if name not in named:
                raise InvalidInputError(
                    f"params mask for {name!r}: no such parameter; known: {sorted(named)}"
                )
            mask = torch.as_tensor(mask)
            if mask.shape != named[name].shape:
                raise InvalidInputError(
                    f"params mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(named[name].shape)}"
                )
            if mask.dtype != torch.bool:
                mask = mask != 0
            if mask.any():
                out[name] = None if mask.all() else mask
        if not out:
            raise InvalidInputError("params masks select no entry (every mask is all False)")
        return out
    if callable(params):
        chosen = {k: None for k, p in named.items() if params(k, p)}
        if not chosen:
            raise InvalidInputError("the params predicate selected no parameter")
        return chosen
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns:
        raise InvalidInputError("params is an empty list: it selects no parameter")
    chosen = {}
    for pat in patterns:
        hits = [k for k in named if k == pat or fnmatch.fnmatchcase(k, pat)]
        if not hits:
            raise InvalidInputError(
                f"params entry {pat!r} matches no parameter name; known: {sorted(named)}"
            )
        chosen.update({k: None for k in hits})
    return {k: chosen[k] for k in named if k in chosen}


# --------------------------------------------------------------------------------------------
# the target
# --------------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` so that ``torch.func.functional_call`` can drive it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, spec: Any):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.spec = spec

    def forward(self, *leaves: Tensor) -> Tensor:
        return self.loss_fn(self.model, _unflatten(list(leaves), self.spec))


class _Slot(NamedTuple):
    name: str
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    numel: int


class SamplingTarget:
    """A model's loss around w*, ready for sampling (built by :func:`prepare_target`).

    Attributes:
        n: number of samples in the data.
        batch_size: minibatch size (``n`` means full batch).
        dim: number of sampled coordinates D (whole selected tensors).
        num_selected: number of coordinates actually sampled (mask applied).
        anchor: w* as a flat float32 vector of shape ``(D,)``.
        mask: flat 0/1 float32 mask of shape ``(D,)`` or None.
        init_loss: ``L_n(w*)`` on the full data.
        batch_loss_std: standard deviation of the minibatch loss at w* across disjoint batches.
        param_names: names of the sampled parameters.
        device: where sampling runs.
        mode: ``"vmap"`` or ``"loop"`` (how chains are advanced), or ``"auto"`` until decided.
        compile: ``True``, ``False`` or ``"auto"``: whether runs use the compiled SGLD step.
        expected_calls: the ``compile="auto"`` hint (runs of this structure planned).
    """

    def __init__(self, model: nn.Module, leaves: list[Tensor], spec: Any, loss_fn: LossFn,
                 selection: dict[str, Tensor | None], batch_size: int, device: torch.device,
                 mode: str, eval_batch_size: int, compile: bool | str = "auto",
                 expected_calls: int = 1):
        self.model = model
        self.compile = compile
        self.expected_calls = expected_calls
        #: whether the last run of chains on this target used the compiled step
        self.last_compiled = False
        self.loss_fn = loss_fn
        self.device = device
        self.leaves = [t.to(device) for t in leaves]
        self.spec = spec
        self.n = int(leaves[0].shape[0])
        self.batch_size = min(int(batch_size), self.n)
        self.full_batch = self.batch_size >= self.n
        self.eval_batch_size = eval_batch_size
        named = dict(model.named_parameters())
        slots, offset, masks = [], 0, []
        for name, m in selection.items():
            p = named[name]
            slots.append(_Slot(name, p.shape, p.dtype, offset, p.numel()))
            masks.append(torch.ones(p.numel(), dtype=torch.bool) if m is None
                         else m.reshape(-1).cpu())
            offset += p.numel()
        self.slots = slots
        self.param_names = tuple(s.name for s in slots)
        self.dim = offset
        with torch.no_grad():
            # w* per parameter: views of the model's own tensors where they are float32 on the
            # device (no copy; the model is never modified), else float32 copies. The flat
            # ``anchor`` is assembled on first use; the lean path never needs it.
            self._anchor_parts = [named[s.name].detach().reshape(-1).to(device=device,
                                                                      dtype=torch.float32)
                                  for s in slots]
        self._versions = [named[s.name]._version for s in slots]
        self._sources = [named[s.name] for s in slots]
        self._anchor: Tensor | None = None
        flat_mask = torch.cat(masks)
        self.num_selected = int(flat_mask.sum())
        self.mask = None if bool(flat_mask.all()) else flat_mask.to(device, torch.float32)
        sampled = set(self.param_names)
        self.consts = {
            "model." + k: v.detach().to(device)
            for k, v in list(model.named_parameters()) + list(model.named_buffers())
            if k not in sampled
        }
        self._wrapper = _LossModule(model, loss_fn, spec)
        self._copies: list[nn.Module] = []
        self._lean_buffers = False
        self._work: Tensor | None = None
        self._gbuf: Tensor | None = None
        self._vmapped: dict[bool, Callable] = {}
        self._batch_cache: tuple[tuple, list[Tensor], list[Any]] | None = None
        self._grad_seconds: float | None = None
        #: bytes one chain's forward pass saves for the backward pass in loop mode (activations;
        #: the parameters excluded), measured on the first step of several chains
        self._saved_bytes: int | None = None
        #: the :class:`devinterp.analyses.parallel.CheckGate` of a parallel lean run (a MALA
        #: check runs while the other workers wait between steps), or None
        self.lean_gate: Any = None
        self._lean_params: list[list[tuple[int, nn.Parameter]]] = []
        self._lean_ctx: _LeanMove | None = None
        self.mode = mode
        self.init_loss, self.batch_loss_std = self._loss_at_anchor()

    @property
    def anchor(self) -> Tensor:
        """w* as a flat float32 vector ``(D,)`` (assembled on first use)."""
        if self._anchor is None:
            self.check_unchanged()
            with torch.no_grad():
                self._anchor = torch.cat(self._anchor_parts)
        return self._anchor

    @anchor.setter
    def anchor(self, value: Tensor) -> None:
        self._anchor = value
        self._anchor_parts = [value[s.offset:s.offset + s.numel] for s in self.slots]

    def check_unchanged(self) -> None:
        """Raise if the model's sampled weights were modified in place since preparation."""
        for s, p, version in zip(self.slots, self._sources, self._versions, strict=True):
            if p._version != version:
                raise InvalidInputError(
                    f"the model's parameter {s.name!r} was modified in place after "
                    "prepare_target (w* moved): prepare the target again for the new weights")

    # ---- functional loss ---------------------------------------------------------------------
    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {
            "model." + s.name: flat[s.offset:s.offset + s.numel].view(s.shape).to(s.dtype)
            for s in self.slots
        }

    def _loss_flat(self, flat: Tensor, *leaves: Tensor) -> Tensor:
        return self._loss_params(self._unflatten(flat), *leaves)

    def _loss_parts(self, parts: Sequence[Tensor], *leaves: Tensor) -> Tensor:
        """The loss with one flat tensor per sampled parameter (e.g. ``_anchor_parts``)."""
        return self._loss_params({"model." + s.name: p.view(s.shape).to(s.dtype)
                                  for s, p in zip(self.slots, parts, strict=True)}, *leaves)

    def _loss_params(self, params: dict[str, Tensor], *leaves: Tensor) -> Tensor:
        params.update(self.consts)
        loss = torch.func.functional_call(self._wrapper, params, leaves)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise InvalidInputError(
                f"loss_fn(model, batch) must return the scalar mean loss of the batch, got {shape}"
            )
        return loss.reshape(()).float()

    def loss(self, flat: Tensor, batch_leaves: Sequence[Tensor]) -> Tensor:
        """Mean loss at one flat parameter vector ``(D,)`` on one batch (no gradient)."""
        with torch.no_grad():
            return self._loss_flat(flat, *batch_leaves)

    def _loss_at_anchor(self) -> tuple[float, float]:
        """``L_n(w*)`` over the full data in chunks, and the spread of minibatch losses."""
        chunk = min(self.batch_size, self.eval_batch_size)
        total, losses, sizes = 0.0, [], []
        #: seconds per sample of the fastest forward pass (the first is a warm-up when more
        #: than one is made); for :meth:`gradient_seconds`
        self._forward_seconds = None
        with torch.random.fork_rng(devices=self._rng_devices()):
            for start in range(0, self.n, chunk):
                part = [t[start:start + chunk] for t in self.leaves]
                t0 = time.perf_counter()
                with torch.no_grad():
                    value = float(self._loss_parts(self._anchor_parts, *part))
                per_sample = (time.perf_counter() - t0) / len(part[0])
                if (start == chunk or self.n <= chunk) or (
                        start > chunk and per_sample < self._forward_seconds):
                    self._forward_seconds = per_sample
                if not math.isfinite(value):
                    raise InvalidInputError(
                        f"the loss at the given weights is not finite ({value}) on samples "
                        f"{start}..{start + len(part[0]) - 1}: check the model and the data"
                    )
                total += value * len(part[0])
                losses.append(value)
                sizes.append(len(part[0]))
        spread = float(np.std(losses[:-1] if len(losses) > 2 and sizes[-1] != sizes[0]
                              else losses))
        return total / self.n, spread

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    # ---- gradients -------------------------------------------------------------------------
    def _grad_vmap(self, flat: Tensor, batch: list[Tensor], shared: bool) -> tuple[Tensor, Tensor]:
        fn = self._vmapped.get(shared)
        if fn is None:
            in_dims = (0,) + (None if shared else 0,) * len(self.leaves)
            fn = torch.func.vmap(torch.func.grad_and_value(self._loss_flat), in_dims=in_dims,
                                 randomness="different")
            self._vmapped[shared] = fn
        return fn(flat, *batch)

    def _ensure_copies(self, chains: int, *, lean: bool = False) -> None:
        """Per-chain model copies whose sampled parameters are views of rows of ``_work``.

        Batched path: gradients land in ``_gbuf``, one row per chain, and one backward pass
        serves all chains. ``lean``: each parameter is a tensor of its own on its row of
        ``_work`` (its own autograd version counter) with a hook that moves it as soon as its
        gradient has been accumulated (:meth:`lean_step`); no gradient buffer is made here.
        """
        dtypes = {s.dtype for s in self.slots}
        if len(dtypes) != 1:
            raise InvalidInputError("per-chain loop mode needs one dtype for all sampled "
                                    f"parameters, got {sorted(map(str, dtypes))}; use vmap")
        dtype = dtypes.pop()
        if (self._work is not None and self._work.shape[0] >= chains
                and self._lean_buffers == lean):
            return
        # free the old buffers first: their memory counts while the new ones are allocated
        self._work = self._gbuf = None
        self._copies, self._lean_params = [], []
        self._lean_buffers = lean
        self._work = torch.empty(chains, self.dim, dtype=dtype, device=self.device)
        if not lean:
            self._gbuf = torch.zeros(chains, self.dim, dtype=dtype, device=self.device)
        sampled = {s.name: s for s in self.slots}
        index = {s.name: i for i, s in enumerate(self.slots)}
        # tied weights: every name under which a sampled parameter appears maps to its slot
        canonical = {id(p): name for name, p in self.model.named_parameters()}
        aliases = {name: canonical[id(p)]
                   for name, p in self.model.named_parameters(remove_duplicate=False)}
        # sampled parameters are not copied by deepcopy (placeholders on the meta device)
        memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                    requires_grad=False)
                for name, p in self.model.named_parameters() if name in sampled}
        for c in range(chains):
            replica = copy.deepcopy(self.model, memo=dict(memo))
            views: dict[str, nn.Parameter] = {}
            for pname, p in list(replica.named_parameters(remove_duplicate=False)):
                base = aliases.get(pname, pname)
                owner = replica.get_submodule(pname.rpartition(".")[0]) if "." in pname else replica
                if base not in sampled:
                    p.requires_grad_(False)
                    continue
                if base not in views:
                    s = sampled[base]
                    if lean:
                        new = nn.Parameter(_own_view(self._work, c, s), requires_grad=True)
                        new.register_post_accumulate_grad_hook(_LeanHook(self, index[base]))
                    else:
                        view = self._work[c, s.offset:s.offset + s.numel].view(s.shape)
                        new = nn.Parameter(view, requires_grad=True)
                        new.grad = self._gbuf[c, s.offset:s.offset + s.numel].view(s.shape)
                    views[base] = new
                setattr(owner, pname.rpartition(".")[2], views[base])
            if lean:
                self._lean_params.append(sorted((index[b], v) for b, v in views.items()))
            self._copies.append(replica.to(self.device))  # the rest: constants, buffers

    def _grad_loop(self, flat: Tensor, batch: list[Tensor], shared: bool) -> tuple[Tensor, Tensor]:
        chains = flat.shape[0]
        self._ensure_copies(chains)
        work, gbuf = self._work, self._gbuf
        with torch.no_grad():
            work[:chains].copy_(flat)
            gbuf.zero_()
        losses = []
        each = None if chains > 1 else False
        for c, chain_batch in enumerate(self._chain_batches(batch, shared, chains)):
            if each is None and self._saved_bytes is None:
                counter = _SavedBytes(work)
                with counter.hooks():
                    loss = self._chain_loss(c, chain_batch, batch, shared)
                self._saved_bytes = counter.total
            else:
                loss = self._chain_loss(c, chain_batch, batch, shared)
            if each is None:
                each = self._saved_bytes >= PER_CHAIN_BACKWARD_MIN_BYTES
            if each:  # this chain's activations are freed before the next chain's forward
                loss.backward()
                loss = loss.detach()
            losses.append(loss)
        stacked = torch.stack(losses)
        if not each:
            # one backward pass for all chains: their graphs are disjoint, so the gradient of
            # the sum is each chain's own gradient
            stacked.sum().backward()
        return gbuf[:chains].float(), stacked.detach().float()

    def _chain_batches(self, batch: list[Tensor], shared: bool, chains: int) -> list[Any]:
        """Each chain's batch in the user's structure; cached while ``batch`` is the same
        tensors (the sampling loop refills one buffer per data tensor in place every step)."""
        key = (shared, chains, tuple(id(t) for t in batch))
        cached = self._batch_cache
        if cached is not None and cached[0] == key:
            return cached[2]
        per_chain = [_unflatten(list(batch if shared else [t[c] for t in batch]),
                                self.spec) for c in range(chains)]
        # the tensors are kept alive with the key so that their ids cannot be reused
        self._batch_cache = (key, list(batch), per_chain)
        return per_chain

    def gradient_seconds(self) -> float:
        """Wall time of one chain's gradient on one minibatch at w* (best of two, or the first
        when it takes ``_PROBE_ONCE_SECONDS`` or more; cached).

        Used only to decide whether running the chains in parallel pays (never affects results).
        From ``LEAN_MIN_DIM`` sampled coordinates on, no gradient is taken: ``_GRADIENT_FORWARDS``
        × the fastest forward pass of the evaluation of ``L_n(w*)`` (per sample of a minibatch),
        timed when the target was prepared. A gradient through ``torch.func`` there cost ~5
        chain steps and left ~1.7× the parameters of heap behind (a 10M-parameter transformer,
        ``benchmarks/llc_memory.py``, config ``lean-auto``).
        """
        if (self._grad_seconds is None and self.dim >= LEAN_MIN_DIM
                and getattr(self, "_forward_seconds", None) is not None):
            self._grad_seconds = _GRADIENT_FORWARDS * self._forward_seconds * self.batch_size
        if self._grad_seconds is None:
            batch = [t[:self.batch_size] for t in self.leaves]
            fn = torch.func.grad(self._loss_parts)
            best = math.inf
            try:
                with torch.random.fork_rng(devices=self._rng_devices()):
                    for _ in range(2):
                        t0 = time.perf_counter()
                        fn(self._anchor_parts, *batch)
                        self._sync()
                        best = min(best, time.perf_counter() - t0)
                        if best >= _PROBE_ONCE_SECONDS:  # long enough to trust: one is enough
                            break
            except InvalidInputError:
                raise
            except Exception:  # noqa: BLE001 - a loss torch.func cannot trace: use the estimate
                costs = _compiled.estimated_costs(self, 1)
                best = costs["compute"] + costs["overhead"]
            self._grad_seconds = best
        return self._grad_seconds

    def replica_for(self, device: torch.device | str | None = None) -> SamplingTarget:
        """A copy for another thread or device: same data, w*, loss and settings, its own
        sampling buffers and model copies (the data and w* are shared when on the same device).
        """
        device = self.device if device is None else torch.device(device)
        other = copy.copy(self)
        other._copies, other._work, other._gbuf, other._lean_buffers = [], None, None, False
        other._vmapped, other._batch_cache = {}, None
        other._lean_params, other._lean_ctx, other.lean_gate = [], None, None
        if device != self.device or self.mode == "vmap":
            # functional_call swaps the module's parameters while it runs: one module per thread
            other.model = copy.deepcopy(self.model).to(device)
            other._wrapper = _LossModule(other.model, self.loss_fn, self.spec)
        if device != self.device:
            other.device = device
            other.leaves = [t.to(device) for t in self.leaves]
            other.anchor = self.anchor.to(device)
            other.mask = None if self.mask is None else self.mask.to(device)
            other.consts = {k: v.to(device) for k, v in self.consts.items()}
            if self.mode != "auto" and device.type != self.device.type:
                other.mode = "auto"  # decided again for that device
        return other

    def release_buffers(self) -> None:
        """Forget the per-chain buffers and model copies (the next run makes new ones)."""
        self._copies, self._work, self._gbuf, self._lean_buffers = [], None, None, False
        self._batch_cache, self._lean_params = None, []

    def uses_lean(self, sampler: str, compiled: bool = False) -> bool:
        """Whether a run of ``sampler`` on this target takes the lean loop path."""
        return (self.mode == "loop" and sampler == "sgld" and not compiled
                and self.dim >= LEAN_MIN_DIM and {s.dtype for s in self.slots} == {torch.float32})

    def _chain_loss(self, c: int, chain_batch: Any, batch: list[Tensor], shared: bool) -> Tensor:
        loss = self.loss_fn(self._copies[c], chain_batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            leaves = batch if shared else [t[c] for t in batch]
            self._loss_flat(self.anchor, *leaves)  # raises the explanatory error
        return loss.reshape(())

    def lean_step(self, chains: int, batch: list[Tensor], shared: bool,
                  noise_gens: Sequence[torch.Generator], *, step_size: float,
                  localization: float, nbeta: float, check: bool = False
                  ) -> tuple[Tensor, Tensor | None]:
        """One SGLD step of every chain, chain after chain, in place (the lean path).

        The chains' parameters are the rows of ``_work`` (also the replicas' parameters).
        Each parameter tensor moves as soon as autograd has accumulated its gradient (a
        post-accumulate-grad hook; parameters the loss does not reach move after the backward
        pass, in parameter order), and its gradient is freed at once: no ``(D,)`` gradient
        buffer. Noise is drawn per parameter tensor from each chain's generator, in the order
        the tensors move. With ``check``, the MALA acceptance of the move is computed in one
        ``(D,)`` buffer that exists only during the check: it holds the gradient, then
        ``(w − w')·2/(ε·nβ)``, onto which the backward pass at ``w'`` accumulates ``∇L(w')``
        (see :mod:`devinterp.sgmcmc.mala`). In a parallel run (``lean_gate``) a check runs
        alone: the other workers finish their current chain step and wait, so the run holds
        one check buffer and one worker's working memory at a time, as a sequential run does.

        Returns:
            The minibatch losses before the step ``(C,)`` and the acceptance ``(C,)`` or None.
        """
        self._ensure_copies(chains, lean=True)
        losses = torch.empty(chains, device=self.device)
        acc = torch.empty(chains, device=self.device) if check else None
        gate = self.lean_gate
        for c, chain_batch in enumerate(self._chain_batches(batch, shared, chains)):
            if acc is None:
                with gate.step() if gate is not None else contextlib.nullcontext():
                    losses[c] = self._lean_chain(c, chain_batch, batch, shared, noise_gens[c],
                                                 step_size, localization, nbeta)
            else:
                if gate is None and self.device.type == "cpu":
                    _parallel.return_free_memory()  # the check comes on top of the freed heap
                with gate.check() if gate is not None else contextlib.nullcontext():
                    losses[c], acc[c] = self._lean_chain_checked(
                        c, chain_batch, batch, shared, noise_gens[c], step_size, localization,
                        nbeta)
        return losses, acc

    def _lean_chain(self, c: int, chain_batch: Any, batch: list[Tensor], shared: bool,
                    gen: torch.Generator, step_size: float, localization: float,
                    nbeta: float) -> Tensor:
        """Chain ``c``'s step without a check: the hooks move each tensor in the backward pass."""
        ctx = _LeanMove(gen, step_size, localization, nbeta, set())
        self._lean_ctx = ctx
        try:
            loss = self._chain_loss(c, chain_batch, batch, shared)
            loss.backward()
        finally:
            self._lean_ctx = None
        for i, param in self._lean_params[c]:  # tensors the loss does not reach: no gradient
            if i not in ctx.reached:
                self._lean_move(param, i, torch.zeros_like(param), ctx)
        return loss.detach().float()

    def _lean_move(self, param: Tensor, i: int, grad: Tensor, ctx: _LeanMove) -> None:
        """``w := w − ε/2·∇U(w) + √ε·ξ`` for slot ``i`` of one chain (``grad``: ∇L there)."""
        s = self.slots[i]
        m = None if self.mask is None else self.mask[s.offset:s.offset + s.numel]
        with torch.no_grad():
            ps = param.view(-1)  # in place on the parameter: its version counter sees it
            gs = grad.reshape(-1)  # ours (the gradient is freed): the only temporary
            # ∇U = nβ·g + γ·(w − w*), masked, without a (w − w*) temporary
            gs.mul_(ctx.nbeta).add_(ps, alpha=ctx.localization).sub_(
                self._anchor_parts[i], alpha=ctx.localization)
            if m is not None:
                gs.mul_(m)
            ps.add_(gs, alpha=-ctx.step_size / 2)
            xi = torch.randn(ps.shape, generator=ctx.gen, device=ps.device, dtype=ps.dtype,
                             out=gs)  # the noise reuses the drift's memory
            if m is not None:
                xi.mul_(m)
            ps.add_(xi, alpha=math.sqrt(ctx.step_size))

    def _lean_parts(self, params, p: Tensor, g: Tensor):
        """Per parameter ``i`` of ``params``: ``(i, its slice of p, its slice of g, its mask slice)``."""
        for i, _ in params:
            s = self.slots[i]
            sl = slice(s.offset, s.offset + s.numel)
            yield i, p[sl], g[sl], None if self.mask is None else self.mask[sl]

    def _lean_chain_checked(self, c: int, chain_batch: Any, batch: list[Tensor], shared: bool,
                            gen: torch.Generator, step_size: float, localization: float,
                            nbeta: float) -> tuple[Tensor, Tensor]:
        """Chain ``c``'s step and the MALA acceptance of its move, in a ``(D,)`` buffer made
        for this check and freed after it (one D is mapped and returned to the system)."""
        g = torch.zeros(self.dim, device=self.device)
        sq, half = math.sqrt(step_size), step_size / 2
        check = step_size > 0
        params = self._lean_params[c]
        p = self._work[c]
        for i, param in params:  # the gradients accumulate into the buffer (hooks idle)
            s = self.slots[i]
            param.grad = g[s.offset:s.offset + s.numel].view(s.shape)
        try:
            loss = self._chain_loss(c, chain_batch, batch, shared)
            loss.backward()
            zero = torch.zeros((), device=self.device)
            dist_old, q_fwd = zero.clone(), zero.clone()
            with torch.no_grad():
                for i, ps, gs, m in self._lean_parts(params, p, g):
                    diff = _masked_drift(ps, gs, self._anchor_parts[i], m, nbeta,
                                         localization)  # gs := ∇U (masked)
                    xi = torch.randn(ps.shape, generator=gen, device=ps.device,
                                     dtype=ps.dtype)
                    if m is not None:
                        xi.mul_(m)
                    ps.add_(gs, alpha=-half).add_(xi, alpha=sq)
                    if check:
                        dist_old += diff.pow(2).sum()
                        q_fwd += xi.pow(2).sum()
                        gs.mul_(half).sub_(xi, alpha=sq).mul_(2 / (step_size * nbeta))
            if not check:  # ε = 0: nothing moved
                return loss.detach().float(), torch.ones((), device=self.device)
            loss_new = self._chain_loss(c, chain_batch, batch, shared)
            loss_new.backward()  # accumulates ∇L(w') onto (w − w')·2/(ε·nβ)
            with torch.no_grad():
                dist_new, q_bwd = zero.clone(), zero.clone()
                for i, ps, gs, m in self._lean_parts(params, p, g):
                    diff = _masked_drift(ps, gs, self._anchor_parts[i], m, nbeta,
                                         localization)
                    gs.mul_(half)  # w − w' + ε/2·∇U(w')
                    dist_new += diff.pow(2).sum()
                    q_bwd += gs.pow(2).sum()
                log_ratio = (nbeta * (loss.detach().float() - loss_new.detach().float())
                             + localization / 2 * (dist_old - dist_new)
                             - q_bwd / (2 * step_size) + q_fwd / 2)
                acc = torch.exp(torch.clamp(log_ratio, max=0.0).nan_to_num(nan=-math.inf))
            return loss.detach().float(), acc
        finally:
            for _, param in params:
                param.grad = None

    def grad_and_loss(self, flat: Tensor, batch: list[Tensor], shared: bool = False
                      ) -> tuple[Tensor, Tensor]:
        """Gradients ``(C, D)`` (float32) and losses ``(C,)`` of every chain on its batch.

        Args:
            flat: parameters of every chain, ``(C, D)``.
            batch: data leaves, each ``(C, B, ...)``, or ``(B, ...)`` when ``shared``.
            shared: all chains see the same batch (full batch).
        """
        if self.mode == "loop":
            return self._grad_loop(flat, batch, shared)
        return self._grad_vmap(flat, batch, shared)

    def decide_mode(self, chains: int) -> str:
        """Pick ``"vmap"`` or ``"loop"`` by timing a few gradient steps (cached per structure)."""
        if self.mode != "auto":
            return self.mode
        key = (type(self.model), tuple((s.name, tuple(s.shape), s.dtype) for s in self.slots),
               tuple((tuple(t.shape[1:]), t.dtype) for t in self.leaves), self.batch_size,
               chains, str(self.device), getattr(self.loss_fn, "__qualname__", id(self.loss_fn)))
        if key in _MODE_CACHE:
            self.mode = _MODE_CACHE[key]
            return self.mode
        if self.device.type == "cpu":
            # measured (docs/llc.md): on CPU the per-chain loop with one backward pass matched
            # or beat vmap on every model tried (vmap 3x slower on a 10x10 DLN), so no probe
            self.mode = _MODE_CACHE[key] = "loop"
            return self.mode
        flat = self.anchor.expand(chains, -1).clone()
        if self.full_batch:
            batch, shared = self.leaves, True
        else:
            idx = torch.arange(chains * self.batch_size, device=self.device) % self.n
            batch = [t[idx].view(chains, self.batch_size, *t.shape[1:]) for t in self.leaves]
            shared = False
        timings = {"vmap": math.inf, "loop": math.inf}
        failed = set()
        with torch.random.fork_rng(devices=self._rng_devices()):
            for round_ in range(6):  # interleaved; the first round only warms up
                for mode in ("vmap", "loop"):
                    if mode in failed:
                        continue
                    self.mode = mode
                    try:
                        t0 = time.perf_counter()
                        for _ in range(2):
                            self.grad_and_loss(flat, batch, shared)
                        self._sync()
                    except InvalidInputError:
                        raise
                    except Exception:  # noqa: BLE001 - e.g. a loss_fn that vmap cannot trace
                        failed.add(mode)
                        timings[mode] = math.inf
                        continue
                    if round_:
                        timings[mode] = min(timings[mode], time.perf_counter() - t0)
        # the loop is preferred on a near tie: plain autograd, less memory, any loss_fn
        timings["vmap"] *= 1.1
        if not math.isfinite(min(timings.values())):
            self.mode = "loop"
        else:
            self.mode = min(timings, key=timings.get)
        _MODE_CACHE[key] = self.mode
        return self.mode

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def as_target(model: nn.Module | SamplingTarget, data: Any, loss_fn: LossFn | None, *, caller: str,
              batch_size: int | None = None, **prepare_kwargs: Any) -> SamplingTarget:
    """``model`` itself if it is a prepared :class:`SamplingTarget`, else :func:`prepare_target`.

    Shared by ``estimate_llc`` and ``calibrate``: the batch size defaults to the DataLoader's, else
    512; the loss to :func:`devinterp.analyses.losses.lm_loss` (next-token cross-entropy);
    ``caller`` names the function in the error raised when data is missing.
    """
    if isinstance(model, SamplingTarget):
        return model
    if data is None:
        raise InvalidInputError(f"{caller} needs data (and loss_fn(model, batch), default lm_loss)")
    if loss_fn is None:
        from devinterp.analyses.losses import lm_loss

        loss_fn = lm_loss
    if batch_size is None and not isinstance(data, torch.utils.data.DataLoader):
        batch_size = 512
    return prepare_target(model, data, loss_fn, batch_size=batch_size, **prepare_kwargs)


def prepare_target(model: nn.Module, data: Any, loss_fn: LossFn, *, params: ParamSelection = None,
                   batch_size: int | None = None, device: str | torch.device | None = None,
                   vectorize: bool | str = "auto", eval_batch_size: int = 8192,
                   compile: bool | str = "auto", expected_calls: int = 1) -> SamplingTarget:
    """Validate inputs and prepare a model's loss for sampling around its current weights w*.

    The model itself is never modified: its weights are copied into a flat float32 vector and
    gradients are taken through ``torch.func.functional_call`` or private model copies.

    Args:
        model: the network at w*. Its current train/eval mode is used as is.
        data: a tensor (a dataset of its rows, e.g. token ids ``(n, T)``), a tuple or dict of
            tensors with samples along the first dimension, a Dataset (items collated as a
            DataLoader would: tensors, tuples, dicts, HuggingFace ``BatchEncoding``), a list of
            dict samples, or a DataLoader (its dataset and batch size are used); moved to
            ``device`` in full.
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss``; ``batch`` has exactly the
            structure a DataLoader over ``data`` yields: a tensor for tensor data, a tuple for
            tuple data or a ``TensorDataset``, a dict (or ``BatchEncoding``) for dict samples.
        params: which parameters to sample (others stay at w*): a name or glob pattern, a list of
            them, a predicate ``(name, param) -> bool``, or ``{name: bool mask}`` for single
            entries. None: every parameter with ``requires_grad``.
        batch_size: minibatch size; None takes the DataLoader's, else full batch.
        device: where to sample; None: the model's device.
        vectorize: ``True`` advances all chains with ``torch.func.vmap``, ``False`` loops over
            per-chain model copies, ``"auto"`` times both on a few steps (cached per structure).
        eval_batch_size: chunk size for the full-data loss ``L_n(w*)``.
        compile: ``True`` runs SGLD steps through ``torch.compile`` (falls back to eager with a
            warning when unavailable or when compiling fails), ``False`` never, ``"auto"``
            compiles when :func:`devinterp.analyses.compiled.should_compile` says the planned
            work pays for the compile (a deterministic rule, no timing).
        expected_calls: runs of chains of this model structure planned in this process (e.g.
            the number of snapshots to estimate): the hint ``compile="auto"`` weighs against
            the one-time compile cost.

    Raises:
        InvalidInputError: empty data, no trainable/selected parameters, a non-scalar or
            non-finite loss, a bad batch size.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise InvalidInputError("loss_fn must be callable as loss_fn(model, batch)")
    leaves, spec, loader_batch = _materialize(data)
    selection = _select(model, params)
    if batch_size is None:
        batch_size = loader_batch or leaves[0].shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
    if vectorize not in (True, False, "auto"):
        raise InvalidInputError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device} requested but CUDA is not available")
    _compiled.check_compile_option(compile)
    _compiled.check_expected_calls(expected_calls)
    mode = {True: "vmap", False: "loop", "auto": "auto"}[vectorize]
    return SamplingTarget(model, leaves, spec, loss_fn, selection, batch_size, device, mode,
                          eval_batch_size, compile=compile, expected_calls=expected_calls)


# --------------------------------------------------------------------------------------------
# chains
# --------------------------------------------------------------------------------------------
class StepInfo(NamedTuple):
    """What :func:`run_chains` reports for one step of all chains.

    Attributes:
        loss: minibatch loss of each chain at the parameters *before* the step, ``(C,)``.
        sampler_info: the kernel's info (drift, noise, ...).
        acceptance: MALA acceptance probability per chain ``(C,)`` on checked steps, else None.
        correction: SGLD only (not on the lean path): ``ε/8·∇(nβL_batch)·∇U`` per chain ``(C,)``
            at the parameters before the step, the discretisation correction of the LLC
            estimate (:func:`discretisation_correction`); None otherwise.
    """

    loss: Tensor
    sampler_info: Any
    acceptance: Tensor | None
    correction: Tensor | None = None


def discretisation_correction(old: Tensor, anchor: Tensor, drift: Tensor, *, step_size: float,
                              localization: float) -> Tensor:
    """``ε/8·∇(nβL)·∇U`` per chain from the SGLD drift ``∇U = nβ∇L + γ(w − w*)`` (masked).

    Subtracted from ``nβ·(L − L_n(w*))`` it removes the step size's bias of the LLC estimate in
    every locally quadratic direction, minibatch noise included: the Euler–Maruyama chain's
    stationary excess in a direction of curvature ``a`` is ``½/(1 − εa/4)`` instead of ``½``,
    and ``ε/8·E[a²x²] = (εa/8)/(1 − εa/4)`` is exactly the difference (docs/calibration.md).
    """
    c = drift.shape[0]
    d = drift.reshape(c, -1)
    w = old.reshape(c, -1)
    a = anchor.reshape(-1, d.shape[1]).expand(c, -1)
    # row-wise dot products as batched matrix products: no (C, D) temporary
    dot = lambda x, y: torch.einsum("cd,cd->c", x, y).float()  # noqa: E731
    return (step_size / 8) * (dot(d, d) - localization * (dot(w, d) - dot(a, d)))


def _seeds(seed: int, chains: int) -> list[tuple[int, int]]:
    children = np.random.SeedSequence(seed).spawn(chains)
    return [tuple(int(x) for x in ch.generate_state(2, dtype=np.uint32)) for ch in children]


def chunk_steps(target: SamplingTarget, chains: int, num_steps: int) -> int:
    """Steps whose noise and minibatch indices are drawn at once, for a run of ``chains``."""
    per_step = chains * (target.dim + (0 if target.full_batch else target.batch_size))
    return int(max(1, min(_MAX_CHUNK_STEPS, num_steps, _CHUNK_ELEMENTS // per_step)))


class _Streams:
    """Per-chain noise and minibatch streams.

    Noise and minibatch indices are drawn ahead in chunks; the samples of a step are gathered
    into one reused buffer per data tensor just before the step (small and cache-resident,
    where gathering a whole chunk of batches would stream megabytes through memory).
    """

    def __init__(self, target: SamplingTarget, chains: int, seed: int, num_steps: int, *,
                 chain_ids: Sequence[int] | None = None, draw_noise: bool = True):
        self.target = target
        ids = list(range(chains)) if chain_ids is None else list(chain_ids)
        self.chains = len(ids)
        seeds = _seeds(seed, chains)
        seeds = [seeds[i] for i in ids]
        dev = target.device
        self.noise_gens = [torch.Generator(device=dev).manual_seed(s[0]) for s in seeds]
        self.data_gens = [torch.Generator().manual_seed(s[1]) for s in seeds]
        self.perms: list[Tensor] = [torch.empty(0, dtype=torch.long) for _ in ids]
        # the chunk depends on the run's total number of chains only, so that a group of its
        # chains run elsewhere draws exactly the same noise (the draws depend on the chunking)
        self.chunk = chunk_steps(target, chains, num_steps)
        self.draw_noise = draw_noise
        self.noise = (torch.empty(self.chains, self.chunk, target.dim, device=dev) if draw_noise
                      else None)
        self.idx: Tensor | None = None
        b = target.batch_size
        self.buffers = [] if target.full_batch else [
            torch.empty(self.chains * b, *t.shape[1:], dtype=t.dtype, device=dev)
            for t in target.leaves]
        self.batch_views = [buf.view(self.chains, b, *buf.shape[1:]) for buf in self.buffers]

    def _indices(self, c: int, count: int) -> Tensor:
        need = count * self.target.batch_size
        parts, have = [self.perms[c]], len(self.perms[c])
        while have < need:
            p = torch.randperm(self.target.n, generator=self.data_gens[c])
            parts.append(p)
            have += len(p)
        pool = torch.cat(parts)
        self.perms[c] = pool[need:]
        return pool[:need].view(count, self.target.batch_size)

    def next_chunk(self, count: int) -> Tensor | None:
        """Draw the noise ``(C, count, D)`` and minibatch indices of the next ``count`` steps."""
        if self.noise is not None:
            for c, gen in enumerate(self.noise_gens):
                torch.randn(count, self.target.dim, generator=gen, out=self.noise[c, :count])
        if not self.target.full_batch:
            idx = torch.stack([self._indices(c, count) for c in range(self.chains)], 1)
            self.idx = idx.reshape(count, -1).to(self.target.device)  # (count, C*B)
        return None if self.noise is None else self.noise[:, :count]

    def batch(self, k: int) -> list[Tensor]:
        """The minibatch of step ``k`` of the current chunk: leaves ``(C, B, ...)``."""
        if self.target.full_batch:
            return self.target.leaves
        assert self.idx is not None
        row = self.idx[k]
        for t, buf in zip(self.target.leaves, self.buffers, strict=True):
            torch.index_select(t, 0, row, out=buf)
        return self.batch_views

    def steps(self, num_steps: int) -> Iterator[tuple[int, Tensor | None, list[Tensor]]]:
        """``(step, its noise (C, D) or None, its minibatch)`` for steps ``0 .. num_steps - 1``,
        drawn ahead chunk by chunk (:meth:`next_chunk`; the draws depend on the chunking)."""
        step = 0
        while step < num_steps:
            count = min(self.chunk, num_steps - step)
            noise = self.next_chunk(count)
            for k in range(count):
                yield step, None if noise is None else noise[:, k], self.batch(k)
                step += 1


def _check_sampler(sampler: str) -> Any:
    if sampler not in SAMPLERS:
        raise InvalidInputError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler]


def default_nbeta(n: int) -> float:
    """``n / log n`` (β* = 1/log n, Watanabe's WBIC temperature), with n the number of samples."""
    return n / math.log(n) if n > 1 else 1.0


def run_chains(target: SamplingTarget, *, num_chains: int, num_steps: int, step_size: float,
               localization: float, nbeta: float, sampler: str = "sgld", seed: int = 0,
               sampler_kwargs: Mapping[str, Any] | None = None,
               acceptance_steps: Collection[int] = (), compile: bool | str | None = None,
               expected_calls: int | None = None, chain_ids: Sequence[int] | None = None,
               restore_rng: bool = True, reuse_buffers: bool = False
               ) -> Iterator[tuple[int, Any, StepInfo]]:
    """Advance ``num_chains`` chains from w* together in this thread and yield ``(step, state, info)``.

    ``state`` is the sampler state *after* the step, with ``params`` of shape ``(C, D)``;
    ``info.loss`` is each chain's minibatch loss *before* it. The caller records what it needs.
    The global RNG state (used only by random layers such as dropout) is saved at the start and
    restored when the generator finishes or is closed.

    On the lean path (SGLD in loop mode with at least ``LEAN_MIN_DIM`` coordinates, see
    :meth:`SamplingTarget.lean_step`) ``state.params`` is a live view of buffers that the next
    step overwrites (copy it to keep it), ``state.anchor`` and ``info.sampler_info`` are None.

    :func:`devinterp.analyses.parallel.iter_chunks` runs groups of chains on several cores or
    devices with this function; chain ``c`` draws the same noise and minibatches whichever
    group runs it, so the results do not depend on the grouping.

    Args:
        target: from :func:`prepare_target`.
        num_chains: C.
        num_steps: total number of steps (burn-in included).
        step_size: ε.
        localization: γ.
        nbeta: nβ.
        sampler: ``"sgld"``, ``"rmsprop_sgld"`` or ``"sgnht"``.
        seed: chain c uses generators seeded from ``SeedSequence(seed).spawn(C)[c]``.
        sampler_kwargs: extra keyword arguments of the kernel's ``step`` (e.g. ``diffusion``).
        acceptance_steps: steps at which to also compute the MALA acceptance of the move
            (one extra gradient evaluation each; SGLD and pSGLD only).
        compile: ``True``/``False``/``"auto"``: run the step through ``torch.compile`` (SGLD
            only; see :mod:`devinterp.analyses.compiled`); None: the target's setting.
        expected_calls: hint for ``compile="auto"``: runs of this structure planned in this
            process; None: the target's.
        chain_ids: run only these chains of the ``num_chains`` (their seeds, noise and
            minibatches are those they have in the full run); ``state`` then has one row each.
        restore_rng: save and restore the global RNG state around the run.
        reuse_buffers: SGLD in loop mode (eager, float32) moves the chains in place in the
            buffer the model copies read (no per-step copy and no fresh ``(C, D)``
            temporaries; same numbers): ``state.params`` and ``info.sampler_info`` are then
            buffers that the next step overwrites, except the last step's ``state.params``
            (a copy). :func:`sample_chains` uses it.
    """
    if compile is not None:
        _compiled.check_compile_option(compile)
    if expected_calls is not None:
        _compiled.check_expected_calls(expected_calls)
    kernel = _check_sampler(sampler)
    kwargs = dict(sampler_kwargs or {})
    init_kwargs = {}
    if sampler == "sgnht" and "diffusion" in kwargs:
        init_kwargs["diffusion"] = kwargs["diffusion"]
    ids = list(range(num_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    if not ids or any(not 0 <= c < num_chains for c in ids):
        raise InvalidInputError(f"chain_ids must be a non-empty subset of range({num_chains}), "
                                f"got {chain_ids!r}")
    rows = len(ids)
    target.check_unchanged()
    target.decide_mode(rows)
    shared = target.full_batch
    fast = _compiled.compiled_step(
        target, rows, shared, num_steps=num_steps, sampler=sampler, step_size=step_size,
        localization=localization, nbeta=nbeta,
        compile=target.compile if compile is None else compile,
        expected_calls=target.expected_calls if expected_calls is None else expected_calls)
    if fast is not None and kwargs:
        fast = None  # sampler_kwargs (none for SGLD today) are not part of the compiled step
    target.last_compiled = fast is not None
    lean = not kwargs and target.uses_lean(sampler, compiled=fast is not None)
    streams = _Streams(target, num_chains, seed, num_steps, chain_ids=ids, draw_noise=not lean)
    check = set(acceptance_steps) if sampler != "sgnht" else set()
    saved = _save_rng(target) if restore_rng else None
    try:
        if lean:
            yield from _run_lean(target, streams, rows, num_steps, check, step_size=step_size,
                                 localization=localization, nbeta=nbeta)
            return
        if (reuse_buffers and fast is None and sampler == "sgld" and not kwargs
                and target.mode == "loop" and {s.dtype for s in target.slots} == {torch.float32}):
            yield from _run_in_place(target, streams, rows, num_steps, check,
                                     step_size=step_size, localization=localization, nbeta=nbeta)
            return
        state = kernel.init(target.anchor.expand(rows, -1), target.anchor, target.mask,
                            **init_kwargs)
        for step, noise, batch in streams.steps(num_steps):
            if fast is not None:
                try:
                    params, loss, drift = fast(state.params, noise, batch)
                except InvalidInputError:
                    raise
                except Exception as exc:  # noqa: BLE001 - never fail an estimate on compile
                    _compiled.mark_failed(fast, exc)
                    fast = None
                    target.last_compiled = False
            if fast is not None:
                new_state = state._replace(params=params)
                info = sgld.SGLDInfo(drift, noise)
            else:
                grads, loss = target.grad_and_loss(state.params, batch, shared)
                new_state, info = kernel.step(streams.noise_gens, state, grads,
                                              step_size=step_size, localization=localization,
                                              nbeta=nbeta, noise=noise, **kwargs)
            acc = None
            if step in check:
                acc = _acceptance(target, state, new_state, info, loss, batch, shared,
                                  step_size=step_size, localization=localization, nbeta=nbeta)
            corr = (discretisation_correction(state.params, target.anchor, info.drift,
                                              step_size=step_size, localization=localization)
                    if sampler == "sgld" else None)
            yield step, new_state, StepInfo(loss, info, acc, corr)
            state = new_state
    finally:
        if saved is not None:
            _restore_rng(saved)


def _run_in_place(target: SamplingTarget, streams: _Streams, rows: int, num_steps: int,
                  check: set[int], *, step_size: float, localization: float, nbeta: float
                  ) -> Iterator[tuple[int, Any, StepInfo]]:
    """SGLD in loop mode with the chains moved in place in the model copies' buffer.

    The same operations as :func:`devinterp.sgmcmc.sgld.step` (so the same numbers), written
    into buffers made once per run: the drift and the scaled noise, and the new parameters
    into the rows of ``target._work`` that the model copies read, so the next gradient needs
    no copy of the parameters (:meth:`SamplingTarget._grad_loop` copies a buffer onto itself:
    a no-op). A checked step keeps a copy of the parameters before the move.
    """
    target._ensure_copies(rows)
    work = target._work
    assert work is not None
    anchor, mask = target.anchor, target.mask
    params = work[:rows]
    with torch.no_grad():
        params.copy_(anchor.expand(rows, -1))
    drift, scaled = torch.empty_like(params), torch.empty_like(params)
    sq, half = math.sqrt(step_size), -step_size / 2
    state = sgld.SGLDState(params, anchor, mask)
    for step, noise, batch in streams.steps(num_steps):
        grads, loss = target.grad_and_loss(params, batch, target.full_batch)
        with torch.no_grad():
            # sgld.drift and sgld.step, into the run's buffers
            torch.sub(params, anchor, out=drift).mul_(localization).add_(grads, alpha=nbeta)
            if mask is not None:
                drift.mul_(mask)
            torch.mul(noise, sq, out=scaled)
            if mask is not None:
                scaled.mul_(mask)
            corr = discretisation_correction(params, anchor, drift, step_size=step_size,
                                             localization=localization)
            old = state._replace(params=params.clone()) if step in check else None
            params.add_(drift, alpha=half).add_(scaled)
        info = sgld.SGLDInfo(drift, noise)
        acc = None
        if old is not None:
            acc = _acceptance(target, old, state, info, loss, batch, target.full_batch,
                              step_size=step_size, localization=localization, nbeta=nbeta)
        out = state if step + 1 < num_steps else state._replace(params=params.clone())
        yield step, out, StepInfo(loss, info, acc, corr)


def _run_lean(target: SamplingTarget, streams: _Streams, rows: int, num_steps: int,
              check: set[int], *, step_size: float, localization: float, nbeta: float
              ) -> Iterator[tuple[int, Any, StepInfo]]:
    target._ensure_copies(rows, lean=True)
    work = target._work
    assert work is not None
    with torch.no_grad():
        for s, a in zip(target.slots, target._anchor_parts, strict=True):
            work[:rows, s.offset:s.offset + s.numel].copy_(a.expand(rows, -1))
    # no flat w* on this path (it would cost another D): ``anchor`` is None
    state = sgld.SGLDState(work[:rows], None, target.mask)
    for step, _, batch in streams.steps(num_steps):
        loss, acc = target.lean_step(rows, batch, target.full_batch, streams.noise_gens,
                                     step_size=step_size, localization=localization,
                                     nbeta=nbeta, check=step in check)
        yield step, state, StepInfo(loss, None, acc)


def _save_rng(target: SamplingTarget) -> tuple[Tensor, list[tuple[int, Tensor]]]:
    cuda = []
    if target.device.type == "cuda":
        index = target.device.index if target.device.index is not None else torch.cuda.current_device()
        cuda.append((index, torch.cuda.get_rng_state(index)))
    return torch.get_rng_state(), cuda


def _restore_rng(saved: tuple[Tensor, list[tuple[int, Tensor]]]) -> None:
    cpu, cuda = saved
    torch.set_rng_state(cpu)
    for index, state in cuda:
        torch.cuda.set_rng_state(state, index)


def _acceptance(target: SamplingTarget, old: Any, new: Any, info: Any, loss: Tensor,
                batch: list[Tensor], shared: bool, *, step_size: float, localization: float,
                nbeta: float) -> Tensor:
    grads_new, loss_new = target.grad_and_loss(new.params, batch, shared)
    mask = target.mask
    u_old = mala.potential(old.params, target.anchor, loss, localization=localization,
                           nbeta=nbeta, mask=mask)
    u_new = mala.potential(new.params, target.anchor, loss_new, localization=localization,
                           nbeta=nbeta, mask=mask)
    drift_new = (new.params - target.anchor).mul_(localization).add_(grads_new, alpha=nbeta)
    return mala.acceptance_probability(
        old.params, new.params, u_old, u_new, info.drift, drift_new, step_size=step_size,
        precond=getattr(info, "precond", None), mask=mask)


@dataclass(frozen=True)
class ChainTraces:
    """Loss traces of chains run by :func:`sample_chains`.

    Attributes:
        losses: ``(C, T)`` minibatch losses, ``T`` = steps completed (all of them unless a chain
            diverged with ``on_divergence="stop"``).
        init_loss: ``L_n(w*)`` on the full data.
        nbeta: nβ used.
        step_size: ε used.
        localization: γ used.
        acceptance: ``(checks, C)`` MALA acceptance probabilities (empty when none were checked).
        acceptance_steps: the steps of those checks.
        diverged_chain: the first chain that diverged, or None.
        diverged_step: the step at which it did, or None.
        seconds: wall time of the sampling loop.
        mode: ``"vmap"`` or ``"loop"``.
        compiled: whether the steps ran through the compiled SGLD step.
        final_params: ``(C, D)`` parameters after the last step (None after a divergence, and
            on the lean path: its chains run one after the other in one reused chain state per
            worker, and keeping every chain's end point would cost the C × D it saves; use
            :func:`run_chains` with ``chain_ids`` for a chain's parameters).
        workers: how many workers ran the chains (1: this thread).
        backend: ``"inline"``, ``"thread"`` or ``"process"``.
        corrections: ``(C, T)`` discretisation corrections ``ε/8·∇(nβL)·∇U`` per step
            (:func:`discretisation_correction`; SGLD off the lean path), else None.
    """

    losses: np.ndarray
    init_loss: float
    nbeta: float
    step_size: float
    localization: float
    acceptance: np.ndarray
    acceptance_steps: tuple[int, ...]
    diverged_chain: int | None = None
    diverged_step: int | None = None
    seconds: float = 0.0
    mode: str = "vmap"
    compiled: bool = False
    final_params: Tensor | None = field(default=None, repr=False, compare=False)
    workers: int = 1
    backend: str = "inline"
    corrections: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def diverged(self) -> bool:
        """Whether some chain produced a non-finite or exploding loss."""
        return self.diverged_chain is not None


def divergence_threshold(target: SamplingTarget, nbeta: float) -> float:
    """Loss above which a chain counts as exploded.

    ``L(w*) + EXPLODE_FACTOR · max(|L(w*)|, spread of minibatch losses at w*, D/(2nβ))``;
    ``D/(2nβ)`` is the expected excess loss of a regular model, an upper bound for the posterior.
    """
    scale = max(abs(target.init_loss), target.batch_loss_std, target.num_selected / (2 * nbeta))
    return target.init_loss + EXPLODE_FACTOR * scale


def _masked_drift(ps: Tensor, gs: Tensor, anchor: Tensor, mask: Tensor | None, nbeta: float,
                  localization: float) -> Tensor:
    """In place ``gs := nβ·gs + γ·(ps − w*)`` (masked): the drift ∇U from the loss gradient
    ``gs``; returns the (masked) displacement ``ps − w*``."""
    diff = ps - anchor
    gs.mul_(nbeta)
    if mask is not None:
        diff.mul_(mask)
        gs.mul_(mask)
    gs.add_(diff, alpha=localization)
    return diff


class _SavedBytes:
    """Counts the bytes autograd saves for the backward pass (``saved_tensors_hooks``), except
    those of the parameters (views of ``work``)."""

    def __init__(self, work: Tensor):
        self.work = work.untyped_storage().data_ptr()
        self.total = 0

    def pack(self, t: Tensor) -> Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # e.g. a sparse tensor: no storage
            ptr = None
        if ptr != self.work:
            self.total += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Count while the context runs (nothing is counted where saved-tensor hooks are
        disabled: the chains then share one backward pass)."""
        ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        try:
            ctx.__enter__()
        except RuntimeError:
            yield
            return
        try:
            yield
        finally:
            ctx.__exit__(None, None, None)


class _LeanMove(NamedTuple):
    """What the lean path's hooks need for one chain's step."""

    gen: torch.Generator
    step_size: float
    localization: float
    nbeta: float
    reached: set[int]


class _LeanHook:
    """Post-accumulate-grad hook of a lean-path parameter: move it with its gradient, free it.

    Holds its target weakly (the target holds the model copies that hold the hooks). Idle
    outside :meth:`SamplingTarget._lean_chain` (MALA checks accumulate into their buffer).
    """

    def __init__(self, target: SamplingTarget, slot: int):
        self.target = weakref.ref(target)
        self.slot = slot

    def __call__(self, param: Tensor) -> None:
        target = self.target()
        ctx = None if target is None else target._lean_ctx
        if ctx is None:
            return
        grad, param.grad = param.grad, None
        ctx.reached.add(self.slot)
        target._lean_move(param, self.slot, grad, ctx)


def _own_view(work: Tensor, row: int, s: _Slot) -> Tensor:
    """Slot ``s`` of ``work[row]`` shaped as the parameter, as a tensor with its own autograd
    version counter (a view shares its base's: moving one parameter in the backward pass would
    then invalidate the saved values of every other)."""
    out = torch.empty(0, dtype=work.dtype, device=work.device)
    out.set_(work.untyped_storage(), work.storage_offset() + row * work.stride(0) + s.offset,
             (s.numel,), (1,))
    return out.view(s.shape)


def _first_bad(trace: Tensor, threshold: float) -> tuple[int, int] | None:
    bad = ~torch.isfinite(trace) | (trace > threshold)
    if not bool(bad.any()):
        return None
    steps = torch.where(bad.any(0))[0]
    first = int(steps[0])
    chain = int(torch.where(bad[:, first])[0][0])
    return chain, first


def sample_chains(target: SamplingTarget, *, num_chains: int = 4, num_steps: int,
                  step_size: float, localization: float = 1.0, nbeta: float | None = None,
                  sampler: str = "sgld", seed: int = 0,
                  sampler_kwargs: Mapping[str, Any] | None = None,
                  acceptance_steps: Collection[int] = (), check_every: int = 100,
                  on_divergence: str = "raise", compile: bool | str | None = None,
                  expected_calls: int | None = None, workers: int | str = "auto",
                  devices: Sequence[str | torch.device] | None = None,
                  backend: str | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  on_progress: Callable[[int], None] | None = None) -> ChainTraces:
    """Run chains and return their loss traces (cheap to call many times on one target).

    The chains run on every core by default (:mod:`devinterp.analyses.parallel`); the traces
    are the same numbers whichever way they are split (with the same intra-op threads per chain).
    On the lean path (:data:`LEAN_MIN_DIM`) each worker runs its chains one after the other
    (one chain state per worker), with the same traces as the chains run together; a
    divergence is still reported at the earliest step (then the lowest chain): the chains
    after a diverged one run up to its step only.

    Args:
        target: from :func:`prepare_target`.
        num_chains, num_steps, step_size, localization, sampler, seed, sampler_kwargs,
            acceptance_steps, compile, expected_calls: as in :func:`run_chains`.
        nbeta: nβ; None: ``n / log n``.
        check_every: check the trace for non-finite/exploding losses every this many steps
            (and at the end); the check is the only host synchronization.
        on_divergence: ``"raise"`` a :class:`ChainDivergedError`, or ``"stop"`` and return the
            trace up to the divergence with ``diverged_chain``/``diverged_step`` set.
        workers: ``"auto"``: on CPU, ``min(chains, cores)`` workers when the run is estimated
            to take a second or more, else 1; one per device with ``devices``. An int forces
            that many; 1 runs the chains in this thread.
        devices: spread the chains over these devices (e.g. ``["cuda:0", "cuda:1"]``).
        backend: ``"process"`` or ``"thread"`` for CPU workers; None: threads.
        progress: called as ``progress(steps_done, num_steps)`` after every chunk of
            ``check_every`` steps (of every chain, or of one chain on the lean path), with
            ``steps_done`` the chain-steps done over the number of chains (rounded down).
        on_progress: called now and then with the number of model evaluations (one per chain
            per step, one more per chain per acceptance check) done since its last call (e.g.
            :meth:`devinterp.analyses.progress.Meter.add`).

    Raises:
        InvalidInputError: bad hyper-parameters.
        ChainDivergedError: a chain diverged and ``on_divergence="raise"``.
    """
    nbeta = default_nbeta(target.n) if nbeta is None else nbeta
    _validate_hyper(num_chains=num_chains, num_steps=num_steps, step_size=step_size,
                    localization=localization, nbeta=nbeta, check_every=check_every)
    if on_divergence not in ("raise", "stop"):
        raise InvalidInputError(f"on_divergence must be 'raise' or 'stop', got {on_divergence!r}")
    _check_sampler(sampler)
    if compile is not None:
        _compiled.check_compile_option(compile)
    if expected_calls is not None:
        _compiled.check_expected_calls(expected_calls)
    run_plan = plan_chains(target, num_chains=num_chains, num_steps=num_steps, sampler=sampler,
                           sampler_kwargs=sampler_kwargs, compile=compile,
                           expected_calls=expected_calls, workers=workers, devices=devices,
                           backend=backend)
    target.decide_mode(len(run_plan.groups[0]))  # workers and replicas inherit the mode
    threshold = divergence_threshold(target, nbeta)
    trace = torch.empty(num_chains, num_steps, device=target.device)
    ctrace = None  # the discretisation corrections, when the run reports them
    accepted: dict[int, Tensor] = {}  # step -> (C,) acceptance
    diverged = None  # (step, chain) of the first divergence: the earliest step, then chain
    final = None
    run_kwargs = dict(num_chains=num_chains, step_size=step_size, localization=localization,
                      nbeta=nbeta, sampler=sampler, seed=seed, sampler_kwargs=sampler_kwargs,
                      acceptance_steps=acceptance_steps, compile=compile,
                      expected_calls=expected_calls, reuse_buffers=True)
    t0 = time.perf_counter()
    # the lean path runs each worker's chains one after the other (one chain state per worker)
    lean = (not sampler_kwargs and target.uses_lean(sampler)
            and (run_plan.backend != "inline" or _compiled.compiled_step(
                target, num_chains, target.full_batch, num_steps=num_steps, sampler=sampler,
                step_size=step_size, localization=localization, nbeta=nbeta,
                compile=target.compile if compile is None else compile,
                expected_calls=target.expected_calls if expected_calls is None
                else expected_calls) is None))
    limit = _parallel.StepLimit(num_steps, processes=run_plan.backend == "process")
    chunks = _parallel.iter_chunks(run_chains, target, run_plan, num_steps=num_steps,
                                   chunk=check_every, run_kwargs=run_kwargs, lean=lean,
                                   limit=limit)
    done = np.zeros(num_chains, dtype=np.int64)  # steps recorded per chain
    try:
        for part in chunks:
            rows = (slice(None) if part.chains is None
                    else torch.as_tensor(part.chains, device=trace.device))
            ids = list(range(num_chains)) if part.chains is None else list(part.chains)
            trace[rows, part.start:part.stop] = part.losses.to(trace.device)
            if part.corrections is not None:
                if ctrace is None:
                    ctrace = torch.full_like(trace, float("nan"))
                ctrace[rows, part.start:part.stop] = part.corrections.to(trace.device)
            for step, acc in part.acceptance:
                if step not in accepted:
                    accepted[step] = torch.full((num_chains,), float("nan"),
                                                device=trace.device)
                accepted[step][rows] = acc.to(trace.device)
            if part.final_params is not None:
                final = part.final_params
            if on_progress is not None:  # one evaluation per chain per step and per check
                on_progress(len(ids) * (part.stop - part.start + len(part.acceptance)))
            done[ids] = part.stop
            bad = _first_bad(trace[rows, part.start:part.stop], threshold)
            if bad is not None:
                here = (bad[1] + part.start, ids[bad[0]])
                if diverged is None or here < diverged:
                    diverged = here
                    # every chain must reach this step (one may diverge earlier); no more
                    limit.lower(here[0] + 1)
            if diverged is not None:
                if (done >= diverged[0] + 1).all():
                    break
                continue
            if progress is not None:
                progress(int(done.sum()) // num_chains, num_steps)
    finally:
        chunks.close()
    if diverged is not None:
        diverged = (diverged[1], diverged[0])  # (chain, step)
        final = None
    acc_steps = sorted(accepted)
    acc_rows = [accepted[s] for s in acc_steps]
    seconds = time.perf_counter() - t0
    if diverged is not None:
        chain, at = diverged
        value = float(trace[chain, at])
        if on_divergence == "raise":
            raise ChainDivergedError(
                f"chain {chain} diverged at step {at}: loss {value:.4g} (L(w*) = "
                f"{target.init_loss:.4g}, limit {threshold:.4g}) with step_size={step_size:g}, "
                f"localization={localization:g}, nbeta={nbeta:g}; try step_size={step_size / 10:g}"
                " or a larger localization",
                chain=chain, step=at, suggested_step_size=step_size / 10)
        trace = trace[:, :at]
        ctrace = None if ctrace is None else ctrace[:, :at]
        keep = [i for i, s in enumerate(acc_steps) if s < at]
        acc_rows = [acc_rows[i] for i in keep]
        acc_steps = [acc_steps[i] for i in keep]
    acc = (torch.stack(acc_rows).cpu().numpy() if acc_rows
           else np.zeros((0, num_chains), dtype=np.float32))
    losses = trace.cpu().numpy()
    losses.flags.writeable = False
    acc.flags.writeable = False
    corrections = None
    if ctrace is not None and not bool(torch.isnan(ctrace).any()):
        corrections = ctrace.cpu().numpy()
        corrections.flags.writeable = False
    return ChainTraces(
        losses=losses, init_loss=target.init_loss, nbeta=float(nbeta), step_size=float(step_size),
        localization=float(localization), acceptance=acc, acceptance_steps=tuple(acc_steps),
        diverged_chain=None if diverged is None else diverged[0],
        diverged_step=None if diverged is None else diverged[1], seconds=seconds,
        mode=target.mode, compiled=target.last_compiled, final_params=final,
        workers=run_plan.workers, backend=run_plan.backend, corrections=corrections)


def plan_chains(target: SamplingTarget, *, num_chains: int, num_steps: int, sampler: str = "sgld",
                sampler_kwargs: Mapping[str, Any] | None = None,
                compile: bool | str | None = None, expected_calls: int | None = None,
                workers: int | str = "auto", devices: Sequence[str | torch.device] | None = None,
                backend: str | None = None) -> _parallel.Plan:
    """How :func:`sample_chains` will run these chains (see :func:`devinterp.analyses.parallel.plan`)."""
    compile = target.compile if compile is None else compile
    expected = target.expected_calls if expected_calls is None else expected_calls
    compiled = sampler == "sgld" and not sampler_kwargs and (
        compile is True or (compile == "auto" and _compiled.should_compile(
            target, chains=num_chains, num_steps=num_steps, sampler=sampler,
            expected_calls=expected)))
    def seconds() -> float:  # measured only when the rule needs it
        return num_steps * num_chains * target.gradient_seconds()

    return _parallel.plan(target, num_chains=num_chains, estimated_seconds=seconds,
                          compiled=compiled, workers=workers, devices=devices, backend=backend)


def _validate_hyper(*, num_chains: int, num_steps: int, step_size: float, localization: float,
                    nbeta: float, check_every: int) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(num_chains) or num_chains <= 0:
        raise InvalidInputError(f"num_chains must be a positive int, got {num_chains!r}")
    if not is_int(num_steps) or num_steps <= 0:
        raise InvalidInputError(f"the number of steps must be a positive int, got {num_steps!r}")
    if not is_int(check_every) or check_every <= 0:
        raise InvalidInputError(f"check_every must be a positive int, got {check_every!r}")
    for name, value in (("step_size", step_size), ("localization", localization),
                        ("nbeta", nbeta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    if step_size < 0:
        raise InvalidInputError(f"step_size must be >= 0, got {step_size}")
    if localization < 0:
        raise InvalidInputError(f"localization must be >= 0, got {localization}")
    if nbeta <= 0:
        raise InvalidInputError(f"nbeta must be > 0, got {nbeta}")
