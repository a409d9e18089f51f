"""A ``torch.compile``'d SGLD step, and the deterministic rule that decides when it pays.

One compiled function computes, for all chains at once, the minibatch losses, their gradients
(``torch.func.grad`` of the summed per-chain losses, chains unrolled) and the SGLD update, so the
whole step becomes one fused graph with no Python or dispatcher overhead per operation. It is
worth it for small models whose eager step is dominated by that overhead (a 10×10 deep linear
network: ~2× faster per step), not for models dominated by real matrix work (an MLP with
784×128 layers), and only when enough steps follow the one-time compile (10–40 s on CPU).

Reuse across snapshots: the compiled function takes the parameters, the constants (parameters
not sampled, buffers), the data and the hyper-parameters (ε, γ, nβ as 0-d tensors) as inputs,
so a new model instance of the same structure, a new ``loss_fn`` closure with the same code, or
new hyper-parameters reuse the compiled code without recompiling. Dynamo's guards check what
the step reads (the model's class and attributes, the loss function's code and the values it
closes over), so a loss that differs in code or in a closed-over constant compiles anew rather
than running the wrong graph. Shapes are static (``dynamic=False``): the sampler's minibatches
always have the full batch size (indices are drawn from concatenated permutations, never a
partial last batch).

The choice for ``compile="auto"`` (:func:`should_compile`) is a pure function of the model's
structure, the number of chains, the batch size, the steps per call and the caller's
``expected_calls`` hint: never of timings, so the same inputs always take the same path (and the
compiled path's floating-point results differ from the eager path's by reassociation only).
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from devinterp.errors import InvalidInputError


class SamplingTarget(Protocol):
    """What this module reads of a :class:`devinterp.analyses.sampling.SamplingTarget`.

    A structural type: this module never imports the sampling module (which imports this one).
    """

    model: nn.Module
    device: torch.device
    n: int
    batch_size: int
    full_batch: bool
    dim: int
    slots: list
    consts: dict[str, Tensor]
    leaves: list[Tensor]
    anchor: Tensor
    mask: Tensor | None

    def _loss_flat(self, flat: Tensor, *leaves: Tensor) -> Tensor: ...

#: Conservative one-time cost of compiling a step, in seconds of wall time: a fixed part plus a
#: part per (chain × leaf module) unrolled into the graph. Measured on a loaded 2-core machine:
#: 10–40 s for a 4-layer DLN with 4 chains (docs/llc.md).
COMPILE_SECONDS_FIXED = 30.0
COMPILE_SECONDS_PER_MODULE_CHAIN = 0.5
#: Eager overhead per leaf module and chain in one step (forward, backward, update), seconds,
#: and the fraction of it that compiling removes. Measured: a 4-chain step of a 4-layer DLN
#: went from 1.37 ms to 0.70 ms of CPU (≈ 42 µs saved per module and chain).
EAGER_SECONDS_PER_MODULE_CHAIN = 50e-6
COMPILE_SAVED_FRACTION = 0.8
#: Assumed throughput of real matrix work (multiply-adds count 2), FLOP/s; the rule compiles
#: only when the eager overhead is at least ``MIN_OVERHEAD_FRACTION`` of the estimated step.
ASSUMED_FLOPS = {"cpu": 40e9, "cuda": 5e12}
MIN_OVERHEAD_FRACTION = 0.3

_COMPILED: dict[tuple, Callable] = {}
_FAILED: set[tuple] = set()
_WARNED: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _WARNED:
        _WARNED.add(text)
        warnings.warn(text, RuntimeWarning, stacklevel=3)


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``torch.compile`` can be used on ``device``, and why not when it cannot."""
    try:
        import torch._dynamo  # noqa: F401

        if not torch._dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python/platform"
    except Exception as exc:  # noqa: BLE001 - any import problem means no compile
        return False, f"torch.compile is unavailable ({exc})"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cc")):
        return False, "no C++ compiler on PATH (inductor's CPU backend needs one)"
    return True, ""


def check_compile_option(compile: bool | str) -> None:
    """Validate a ``compile=`` argument."""
    if not (compile is True or compile is False or (isinstance(compile, str)
                                                    and compile == "auto")):
        raise InvalidInputError(f"compile must be True, False or 'auto', got {compile!r}")


def check_expected_calls(expected_calls: int) -> None:
    """Validate an ``expected_calls=`` hint."""
    if (isinstance(expected_calls, bool) or not isinstance(expected_calls, int)
            or expected_calls < 1):
        raise InvalidInputError(
            f"expected_calls must be a positive int (estimates of this model structure planned "
            f"in this process), got {expected_calls!r}")


def _leaf_modules(model: nn.Module) -> int:
    return max(1, sum(1 for m in model.modules() if not list(m.children())))


def estimated_costs(target: SamplingTarget, chains: int) -> dict[str, float]:
    """The rule's static estimates for one step of ``chains`` chains (seconds)."""
    modules = _leaf_modules(target.model)
    batch = target.n if target.full_batch else target.batch_size
    flops = 6.0 * batch * chains * target.dim  # forward + backward ≈ 3 × 2·B·D per chain
    compute = flops / ASSUMED_FLOPS.get(target.device.type, ASSUMED_FLOPS["cpu"])
    overhead = EAGER_SECONDS_PER_MODULE_CHAIN * modules * chains
    return {
        "compute": compute,
        "overhead": overhead,
        "saving": COMPILE_SAVED_FRACTION * overhead,
        "compile": COMPILE_SECONDS_FIXED + COMPILE_SECONDS_PER_MODULE_CHAIN * modules * chains,
    }


def should_compile(target: SamplingTarget, *, chains: int, num_steps: int, sampler: str,
                   expected_calls: int) -> bool:
    """The ``compile="auto"`` rule (deterministic: no timing is involved).

    Compile when the sampler is SGLD, the eager step is estimated to be mostly overhead
    (``overhead ≥ MIN_OVERHEAD_FRACTION × (overhead + compute)``) and the saving over the
    planned work pays for the compile: ``expected_calls × num_steps × saving > compile cost``.
    """
    if sampler != "sgld":
        return False
    c = estimated_costs(target, chains)
    if c["overhead"] < MIN_OVERHEAD_FRACTION * (c["overhead"] + c["compute"]):
        return False
    return expected_calls * num_steps * c["saving"] > c["compile"]


def _sgld_step(target: SamplingTarget, params: Tensor, anchor: Tensor, mask: Tensor | None,
               noise: Tensor, step_size: Tensor, localization: Tensor, nbeta: Tensor,
               shared: bool, *batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Losses, gradients and the SGLD update of every chain (the function that is compiled)."""
    chains = params.shape[0]

    def total(p: Tensor) -> tuple[Tensor, Tensor]:
        losses = [target._loss_flat(p[c], *(batch if shared else [t[c] for t in batch]))
                  for c in range(chains)]
        stacked = torch.stack(losses)
        return stacked.sum(), stacked

    grads, losses = torch.func.grad(total, has_aux=True)(params)
    drift = (params - anchor) * localization + grads * nbeta
    scaled = noise * step_size.sqrt()
    if mask is not None:
        drift = drift * mask
        scaled = scaled * mask
    new = params - drift * (step_size / 2) + scaled
    return new, losses.detach(), drift


def structure_key(target: SamplingTarget, chains: int, shared: bool) -> tuple:
    """What a compiled step is specialised on (besides dynamo's own guards)."""
    return (type(target.model), tuple((s.name, tuple(s.shape), s.dtype) for s in target.slots),
            tuple((k, tuple(v.shape), v.dtype) for k, v in target.consts.items()),
            tuple((tuple(t.shape[1:]), t.dtype) for t in target.leaves),
            target.batch_size if not shared else target.n, chains, shared,
            target.mask is None, str(target.device))


class CompiledSGLD:
    """The compiled step bound to one target and run (hyper-parameters as 0-d tensors)."""

    def __init__(self, target: SamplingTarget, chains: int, shared: bool, *, step_size: float,
                 localization: float, nbeta: float):
        self.target = target
        self.shared = shared
        self.key = structure_key(target, chains, shared)
        fn = _COMPILED.get(self.key)
        if fn is None:
            fn = _COMPILED[self.key] = torch.compile(_sgld_step, dynamic=False)
        self.fn = fn
        dev = target.device
        self.hyper = tuple(torch.tensor(float(v), device=dev)
                           for v in (step_size, localization, nbeta))

    def __call__(self, params: Tensor, noise: Tensor, batch: list[Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor]:
        if not noise.is_contiguous():
            noise = noise.contiguous()
        t = self.target
        return self.fn(t, params, t.anchor, t.mask, noise, *self.hyper, self.shared, *batch)


def compiled_step(target: SamplingTarget, chains: int, shared: bool, *, num_steps: int,
                  sampler: str, step_size: float, localization: float, nbeta: float,
                  compile: bool | str, expected_calls: int) -> CompiledSGLD | None:
    """A compiled step for this run, or None for the eager path (also when unavailable)."""
    if compile is False:
        return None
    if compile == "auto" and not should_compile(target, chains=chains, num_steps=num_steps,
                                                sampler=sampler, expected_calls=expected_calls):
        return None
    if sampler != "sgld":
        _warn_once(f"compile=True: only the 'sgld' sampler has a compiled step; {sampler!r} "
                   "runs eagerly")
        return None
    ok, why = compile_available(target.device)
    if not ok:
        _warn_once(f"torch.compile unavailable, LLC sampling runs eagerly: {why}")
        return None
    key = structure_key(target, chains, shared)
    if key in _FAILED:
        return None
    return CompiledSGLD(target, chains, shared, step_size=step_size, localization=localization,
                        nbeta=nbeta)


def mark_failed(step: CompiledSGLD, exc: BaseException) -> None:
    """Remember that compiling this structure failed and warn once."""
    _FAILED.add(step.key)
    _COMPILED.pop(step.key, None)
    _warn_once(f"torch.compile of the LLC sampling step failed, running eagerly instead "
               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def describe_rule(target: SamplingTarget, chains: int, num_steps: int,
                  expected_calls: int) -> dict[str, Any]:
    """The rule's inputs and verdict for one run (for docs and debugging)."""
    c = estimated_costs(target, chains)
    return {**c, "steps": expected_calls * num_steps,
            "compile_chosen": should_compile(target, chains=chains, num_steps=num_steps,
                                             sampler="sgld", expected_calls=expected_calls),
            "break_even_calls": math.ceil(c["compile"] / max(num_steps * c["saving"], 1e-12))}
