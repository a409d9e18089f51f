"""``LLCCallback``: estimate the local learning coefficient at scheduled training steps.

A thin adapter over :func:`devinterp.analyses.estimate_llc`: it resolves its schedule when training starts
(step 0 is estimated then), and at each scheduled step copies the current weights, estimates the
LLC on the copy and publishes the result through :func:`devinterp.callbacks._logging.log_scalars`.
The training run is never disturbed: the live model's weights, gradients, ``requires_grad`` flags,
train/eval mode and the global RNG states are left exactly as they were.

Calibration (choosing the SGLD step size and friends) is done once, at the first estimate, and
reused for every later one (and across a resume, through ``state_dict``).
"""

from __future__ import annotations

import copy
import inspect
import random
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from devinterp.analyses.llc import LLCResult, estimate_llc
from devinterp.callbacks._logging import log_scalars, log_text
from devinterp.callbacks._trainer import resolve_schedule, total_steps
from devinterp.errors import ChainDivergedError, InvalidInputError
from devinterp.schedules import Schedule, at, log_spaced
from devinterp.tensorboard import llc_band

__all__ = ["LLCCallback", "calibration_available"]

#: Text tag under which an estimate's warnings (and skipped estimates) are written.
WARNINGS_TAG = "llc/warnings"
#: Text tag of the calibration's table, choice and reason (written once, when it is made).
CALIBRATION_TAG = "llc/calibration"


def _calibration_module():
    """The calibration module, or None where this version of devinterp has none."""
    try:
        from devinterp.analyses import calibration
    except ImportError:
        return None
    return calibration


def calibration_available() -> bool:
    """Whether automatic SGLD calibration (``devinterp.analyses.calibration``) is installed."""
    return _calibration_module() is not None


def _accepted(fn: Callable, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``kwargs`` that ``fn`` accepts as keywords."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


class LLCCallback(pl.Callback):
    """Estimate the LLC of the model at scheduled steps, on a copy of its weights.

    Args:
        data: The data the LLC is measured on: a ``Dataset``, a ``DataLoader`` or a tuple of
            tensors (samples along dimension 0), as :func:`~devinterp.analyses.estimate_llc` takes
            it. Use a fixed sample of the training distribution (a few hundred to a few thousand
            samples); ``n`` and the default ``nβ = n / log n`` refer to it.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of a batch. ``model`` is the copy
            of what ``model_getter`` returns (by default the LightningModule itself, so
            ``lambda m, batch: m.training_loss(batch)`` or a plain function calling ``m(x)`` both
            work); ``batch`` has the structure a DataLoader over ``data`` gives.
        schedule: When to estimate, in optimizer steps (default ``log_spaced(20)`` up to the run's
            total steps); resolved when training starts. Step 0 is always estimated then when
            training starts from scratch.
        calibrate: ``True``: calibrate the sampler once, at the first estimate, with
            :func:`devinterp.analyses.calibrate` on that copy of the weights, and reuse the
            :class:`~devinterp.analyses.Calibration` for every later estimate. Explicit
            hyper-parameters in ``estimate_kwargs`` take precedence over the calibrated ones, and
            when ``step_size`` is given explicitly no calibration is run at all. A
            ``Calibration`` object: reuse it (e.g. from an earlier run or ``devinterp
            calibrate``). ``False``: no calibration; ``estimate_kwargs`` (or
            :func:`estimate_llc`'s defaults) are used as they are.
        model_getter: Maps the LightningModule to the ``nn.Module`` whose LLC is estimated and
            which ``loss_fn`` receives, e.g. ``lambda m: m.model`` for a module wrapping a bare
            network. Default: the LightningModule itself (copied without its trainer).
        eval_mode: Put the copy in eval mode (dropout off) before estimating. The live model's
            mode is never touched.
        on_divergence: What to do when a chain diverges (:class:`ChainDivergedError`):
            ``"warn"`` skips that estimate with a Python warning and a TensorBoard text under
            ``llc/warnings`` (training goes on); ``"raise"`` stops training.
        calibrate_kwargs: Keyword arguments for ``calibrate`` (e.g. its budget).
        **estimate_kwargs: Keyword arguments for :func:`estimate_llc` (``num_chains``,
            ``num_draws``, ``num_burnin``, ``step_size``, ``localization``, ``nbeta``,
            ``batch_size``, ``seed``, ``params``, ...). The same ``seed`` is used at every step
            (default 0), so neighbouring estimates share their noise and differ less by chance.

    Published at each scheduled step (``log_scalars``): everything in
    :meth:`LLCResult.scalars` (``llc/mean``, ``llc/std``, ``llc/stderr``, ``llc/init_loss``,
    ``llc/rhat``, ``llc/ess``, ...) and ``llc/lower``/``llc/upper`` (:func:`devinterp.tensorboard.llc_band`,
    the band of the custom-scalars margin chart). The estimate's warnings, if any, go to the
    TensorBoard text tag ``llc/warnings``. A calibration made here publishes its
    ``Calibration.scalars()`` (``calibration/step_size``, ...) at its step and its table and reason
    as the text ``llc/calibration``. ``results`` holds ``(step, LLCResult)`` of this fit.
    """

    def __init__(
        self,
        data: Any,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        schedule: Schedule | None = None,
        *,
        calibrate: bool | Any = True,
        model_getter: Callable[[pl.LightningModule], nn.Module] | None = None,
        eval_mode: bool = True,
        on_divergence: str = "warn",
        calibrate_kwargs: Mapping[str, Any] | None = None,
        **estimate_kwargs: Any,
    ):
        super().__init__()
        if data is None:
            raise InvalidInputError("LLCCallback needs data: a Dataset, DataLoader or tuple of tensors")
        if not callable(loss_fn):
            raise InvalidInputError("loss_fn must be callable as loss_fn(model, batch) -> scalar loss")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise InvalidInputError(
                f"schedule must be a devinterp Schedule (every, log_spaced, at), got {type(schedule).__name__}"
            )
        if model_getter is not None and not callable(model_getter):
            raise InvalidInputError("model_getter must be callable as model_getter(pl_module) -> nn.Module")
        if on_divergence not in ("warn", "raise"):
            raise InvalidInputError(f"on_divergence must be 'warn' or 'raise', got {on_divergence!r}")
        for key in ("model", "data", "loss_fn", "calibration"):
            if key in estimate_kwargs:
                raise InvalidInputError(
                    f"{key!r} is set by LLCCallback itself; pass it as the callback's own argument"
                )
        bad = set(estimate_kwargs) - set(_accepted(estimate_llc, estimate_kwargs))
        if bad:
            raise InvalidInputError(
                f"unknown estimate_llc argument(s) {sorted(bad)}; see devinterp.analyses.estimate_llc"
            )
        explicit_step = "step_size" in estimate_kwargs and estimate_kwargs["step_size"] != "auto"
        self.calibration: Any = None
        if calibrate is True:
            self._calibrate = not explicit_step
            if self._calibrate and not calibration_available():
                raise InvalidInputError(
                    "calibrate=True needs devinterp.analyses.calibration, which this version does not "
                    "have: pass explicit hyper-parameters (step_size=..., localization=..., ...) or "
                    "calibrate=False"
                )
        elif calibrate is False or calibrate is None:
            self._calibrate = False
        else:
            if not hasattr(calibrate, "to_dict"):
                raise InvalidInputError(
                    f"calibrate must be True, False or a Calibration, got {type(calibrate).__name__}"
                )
            self._calibrate = False
            self.calibration = calibrate
        self.data = data
        self.loss_fn = loss_fn
        self.schedule = log_spaced(20) if schedule is None else schedule
        self.model_getter = model_getter
        self.eval_mode = bool(eval_mode)
        self.on_divergence = on_divergence
        self.calibrate_kwargs = dict(calibrate_kwargs or {})
        self.estimate_kwargs = {"seed": 0, **estimate_kwargs}
        self.results: list[tuple[int, LLCResult]] = []
        self._resolved: Schedule | None = None
        self._last_step: int | None = None

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start, not on_fit_start: by now a resumed run's global_step is restored
        self._resolved = resolve_schedule(self.schedule, trainer) | at([0])
        # the number of estimates this run plans: the hint for estimate_llc(compile="auto"),
        # counted over the whole schedule (not what is left) so a resumed run decides the same
        try:
            self._planned = max(1, len(self._resolved.steps(total_steps(trainer))))
        except Exception:  # noqa: BLE001 - an open-ended schedule: no hint
            self._planned = 1
        if trainer.global_step == 0 and self._last_step is None:
            self._estimate(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._last_step and self._resolved is not None and self._resolved.is_due(step):
            self._estimate(trainer, pl_module, step)

    def state_dict(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            "last_step": self._last_step,
            "calibration": None if cal is None else cal.to_dict(),
            "calibrate": self._calibrate,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        saved = state_dict.get("calibration")
        if saved is not None:
            module = _calibration_module()
            if module is None:
                raise InvalidInputError(
                    "the checkpoint holds an LLC calibration but devinterp.analyses.calibration "
                    "is not available in this version"
                )
            self.calibration = module.Calibration.from_dict(saved)

    # -- the adapter --------------------------------------------------------------------------
    def _target_model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = pl_module if self.model_getter is None else self.model_getter(pl_module)
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"model_getter returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    @staticmethod
    def _copy(model: nn.Module, eval_mode: bool) -> nn.Module:
        """A private copy of ``model`` with its ``requires_grad`` flags, without gradients.

        A LightningModule is copied without its trainer (``LightningModule.__getstate__``).
        """
        grads = {name: p.grad for name, p in model.named_parameters()}
        for p in model.parameters():  # gradients are not part of the copy
            p.grad = None
        try:
            replica = copy.deepcopy(model)
        finally:
            for name, p in model.named_parameters():
                p.grad = grads[name]
        return replica.eval() if eval_mode else replica

    def _calibrate_once(self, trainer: pl.Trainer, replica: nn.Module, step: int) -> None:
        module = _calibration_module()
        kwargs = {**{k: v for k, v in self.estimate_kwargs.items() if k != "step_size"},
                  **self.calibrate_kwargs}
        self.calibration = module.calibrate(replica, self.data, self.loss_fn,
                                            **_accepted(module.calibrate, kwargs))
        self._calibrate = False
        if hasattr(self.calibration, "scalars"):
            log_scalars(trainer, self.calibration.scalars(), step)
        log_text(trainer, CALIBRATION_TAG, f"```\n{self.calibration}\n```", step=step)

    def _estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        replica = self._copy(self._target_model(pl_module), self.eval_mode)
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [replica_device] if (replica_device := _device(replica)).type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                if self._calibrate and self.calibration is None:
                    self._calibrate_once(trainer, replica, step)
                kwargs = dict(self.estimate_kwargs)
                kwargs.setdefault("expected_calls", getattr(self, "_planned", 1))
                if self.calibration is not None:
                    kwargs["calibration"] = self.calibration
                result = estimate_llc(replica, self.data, self.loss_fn, **kwargs)
        except ChainDivergedError as exc:
            if self.on_divergence == "raise":
                raise
            message = f"LLC estimate at step {step} skipped: {exc}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log_text(trainer, WARNINGS_TAG, message, step=step)
            self._last_step = step
            return
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            del replica
        values = result.scalars()
        values.update(llc_band(values))
        log_scalars(trainer, values, step)
        if result.warnings:
            log_text(trainer, WARNINGS_TAG, "\n\n".join(result.warnings), step=step)
        self.results.append((step, result))
        self._last_step = step


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
