"""``LLCCallback``: estimate the local learning coefficient at scheduled training steps.

A thin adapter over :func:`devinterp.analyses.estimate_llc`: it resolves its schedule when training starts
(step 0 is estimated then), and at each scheduled step copies the current weights, estimates the
LLC on the copy and publishes the result through :func:`devinterp.callbacks._logging.log_scalars`.
The training run is never disturbed: the live model's weights, gradients, ``requires_grad`` flags,
train/eval mode and the global RNG states are left exactly as they were.

Calibration (choosing the SGLD step size and friends) is done once, at the first estimate (or, with
``calibrate_at=S``, at the first scheduled step >= S, the earlier estimates being deferred until
then), and reused for every later one (and across a resume, through ``state_dict``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import random
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from devinterp.analyses.budget import DEFAULT_BUDGET
from devinterp.analyses.llc import LLCResult, estimate_llc, longer_chains
from devinterp.callbacks._gate import StepGate
from devinterp.callbacks._logging import log_scalars, log_text
from devinterp.errors import ChainDivergedError, InvalidInputError, ScheduleError
from devinterp.schedules import Schedule, log_spaced
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
        data: The data the LLC is measured on: a tensor (e.g. token ids), a ``Dataset``, a
            ``DataLoader`` or a tuple/dict of tensors (samples along dimension 0), as :func:`~devinterp.analyses.estimate_llc` takes
            it. Use a fixed sample of the training distribution (a few hundred to a few thousand
            samples); ``n`` and the default ``nβ = n / log n`` refer to it.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of a batch. ``model`` is the copy
            of what ``model_getter`` returns (by default the LightningModule itself, so
            ``lambda m, batch: m.training_loss(batch)`` or a plain function calling ``m(x)`` both
            work); ``batch`` has the structure a DataLoader over ``data`` gives (a tensor for
            token-id data, a dict for dict samples). None: :func:`~devinterp.analyses.lm_loss`,
            next-token cross-entropy of a model returning logits or a HuggingFace ``ModelOutput``.
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
        calibrate_at: With ``calibrate=True``: calibrate at the first scheduled step >= this one
            instead of at the first estimate (step 0, an untrained network, is a poor place to
            calibrate: it is far from a minimum). Estimates scheduled before it are deferred: a
            detached CPU copy of the weights is kept per deferred step (memory: one copy of the
            weights each), and once the calibration is made they are estimated with it, in step
            order, and published with their own steps before the current one. If training ends
            before that step, the calibration is made on the final weights when training ends and
            the deferred estimates are published then. ``None`` (default): calibrate at the first
            estimate.
        recalibrate: (Default False: calibrate once.) When an estimate made with a calibration
            made here shows that it no longer
            fits a later snapshot (:func:`devinterp.analyses.calibration.reuse_signs`: MALA
            acceptance outside [0.6, 0.995], draws below L(w*), a changed loss scale),
            calibrate again on that snapshot, publish the estimate made with the new
            calibration (the text ``llc/calibration`` says why) and reuse the new one from
            then on. The first estimate is discarded, its Python warnings too. When its
            acceptance fell below the band, the reused step size is too large for the
            snapshot: the new calibration tries only smaller ones
            (:func:`~devinterp.analyses.calibration.refit_step_sizes`). Each estimate and each
            calibration stays within its ``budget``; a recalibration costs one calibration and
            one estimate more. A calibration passed in (``calibrate=cal``) is never replaced.
        max_recalibrations: With ``recalibrate=True``: at most this many recalibrations in
            the run (default 3; counted across a resume), so its cost stays bounded; after them
            an estimate whose calibration no longer fits is published with its warning. A
            snapshot whose new calibration, on smaller step sizes, still gives an acceptance
            below the band is calibrated again (smaller still) while recalibrations are left.
            The estimates deferred until ``calibrate_at`` get the same treatment, in the
            direction their diagnostic says: a deferred snapshot whose acceptance is below the
            band is estimated again at the next smaller step size of
            :func:`~devinterp.analyses.calibration.refit_step_sizes` (the calibration's chain
            lengths kept; smaller still while it stays below), judged by the estimate's own
            acceptance, not by pilots on a network far from a minimum (they read low and
            shrink the step size far more than needed); any other misfit there is calibrated
            again on that snapshot. The later deferred snapshots reuse the result; the
            calibration made at ``calibrate_at`` (or refit there) is restored for its own
            snapshot and every later one. Each such refit counts towards
            ``max_recalibrations``.
        max_extensions: With ``recalibrate=True``: when a kept estimate whose chain lengths
            came from the calibration shows that its chains are too short for it (split R-hat
            above ``RHAT_WARN``, an effective sample size below ``ESS_WARN`` or a loss trace
            still moving during the draws), it is made again with twice the burn-in and twice
            the draws (same seed, same step size) and that estimate is published instead (the
            first is discarded with its Python warnings), when the longer one fits the
            estimate's ``budget``. At most this many times in the run (default 3; counted
            across a resume; steps in ``extended_at``). A longer estimate that still warns is
            published with its warnings.
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
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        schedule: Schedule | None = None,
        *,
        calibrate: bool | Any = True,
        model_getter: Callable[[pl.LightningModule], nn.Module] | None = None,
        eval_mode: bool = True,
        on_divergence: str = "warn",
        calibrate_kwargs: Mapping[str, Any] | None = None,
        calibrate_at: int | None = None,
        recalibrate: bool = False,
        max_recalibrations: int = 3,
        max_extensions: int = 3,
        **estimate_kwargs: Any,
    ):
        super().__init__()
        if data is None:
            raise InvalidInputError("LLCCallback needs data: a Dataset, DataLoader or tuple of tensors")
        if loss_fn is None:
            from devinterp.analyses.losses import lm_loss

            loss_fn = lm_loss
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
        if calibrate_at is not None and (isinstance(calibrate_at, bool) or not isinstance(calibrate_at, int)
                                         or calibrate_at < 0):
            raise InvalidInputError(
                f"calibrate_at must be a non-negative step (int) or None, got {calibrate_at!r}"
            )
        if (isinstance(max_recalibrations, bool) or not isinstance(max_recalibrations, int)
                or max_recalibrations < 0):
            raise InvalidInputError(
                f"max_recalibrations must be a non-negative int, got {max_recalibrations!r}"
            )
        if (isinstance(max_extensions, bool) or not isinstance(max_extensions, int)
                or max_extensions < 0):
            raise InvalidInputError(
                f"max_extensions must be a non-negative int, got {max_extensions!r}"
            )
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
        self.calibrate_at = calibrate_at
        self.recalibrate = bool(recalibrate)
        self.max_recalibrations = max_recalibrations
        self.max_extensions = max_extensions
        #: Steps whose estimate was made again with longer chains (``max_extensions``).
        self.extended_at: list[int] = []
        # while the deferred estimates are made: the calibration made at calibrate_at and its
        # step, restored afterwards (a deferred snapshot may be recalibrated on its own)
        self._main: tuple[Any, int | None] | None = None
        #: Steps at which a calibration was made again because the previous one no longer fit
        #: (a step twice when its first recalibration still did not fit).
        self.recalibrated_at: list[int] = []
        #: The step at which this callback made its calibration (None: none made here).
        self.calibrated_at: int | None = None
        self._deferred: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.estimate_kwargs = {"seed": 0, **estimate_kwargs}
        self.results: list[tuple[int, LLCResult]] = []
        self._gate = StepGate(self.schedule, owner="LLCCallback")

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the shared gate: step 0 of a fresh run, or a resumed due step not yet done
        step = self._gate.start(trainer)
        # the number of estimates this run plans: the hint for estimate_llc(compile="auto"),
        # counted over the whole schedule (not what is left) so a resumed run decides the same
        try:
            self._planned = max(1, len(self._gate.planned_steps()))
        except ScheduleError:  # an open-ended schedule (e.g. every(n) with no known total): no hint
            self._planned = 1
        if step is not None:
            self._estimate(trainer, pl_module, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._gate.reached(trainer.global_step):
            self._estimate(trainer, pl_module, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # training ended before calibrate_at: calibrate on the final weights, flush what was deferred
        if self._deferred and self._calibrate and self.calibration is None:
            replica = self._copy(self._target_model(pl_module), self.eval_mode)
            step = trainer.global_step
            if self._guarded(trainer, replica, step, calibrate_only=True):
                self._flush_deferred(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            **self._gate.state_dict(),
            "calibration": None if cal is None else cal.to_dict(),
            "calibrate": self._calibrate,
            "calibrated_at": self.calibrated_at,
            "recalibrated_at": list(self.recalibrated_at),
            "extended_at": list(self.extended_at),
            # weights of the estimates deferred until calibrate_at (small models: a copy each)
            "deferred": [(step, dict(weights)) for step, weights in self._deferred],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._gate.load_state_dict(state_dict)
        self.calibrated_at = state_dict.get("calibrated_at")
        self.recalibrated_at = [int(s) for s in state_dict.get("recalibrated_at", [])]
        self.extended_at = [int(s) for s in state_dict.get("extended_at", [])]
        self._deferred = [(int(step), dict(weights)) for step, weights in state_dict.get("deferred", [])]
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

    def _misfit(self, result: LLCResult, step: int, *, again: bool = False) -> str | None:
        """Why the calibration made here no longer fits this estimate's snapshot, or None.

        Later snapshots than the calibration's, and the deferred ones while they are made
        (:meth:`_flush_deferred`: a recalibration there is used for the deferred snapshots
        only). ``again``: the snapshot the calibration was just made on. At most
        ``max_recalibrations`` times per fit.
        """
        if not (self.recalibrate and self.calibrated_at is not None
                and self.calibration is not None
                and (step > self.calibrated_at or again and step == self.calibrated_at
                     or self._main is not None)
                and len(self.recalibrated_at) < self.max_recalibrations):
            return None
        module = _calibration_module()
        signs = getattr(module, "reuse_signs", None)
        if signs is not None:
            found = signs(result, self.calibration)
            return ("; ".join(found) + f" with the reused step_size={self.calibration.step_size:.3g}"
                    if found else None)
        fn = getattr(module, "reuse_warning", None)
        return fn(result, self.calibration) if fn is not None else None

    def _longer(self, result: LLCResult, kwargs: Mapping[str, Any]) -> dict[str, int] | None:
        """Twice the burn-in and draws, when ``result``'s chains are too short for it, or None.

        Only with ``recalibrate=True``, chain lengths from a calibration (not given explicitly),
        extensions left (``max_extensions``) and room in the estimate's ``budget``
        (:func:`devinterp.analyses.llc.longer_chains`).
        """
        if not (self.recalibrate and self.calibration is not None
                and "num_draws" not in self.estimate_kwargs
                and "num_burnin" not in self.estimate_kwargs
                and len(self.extended_at) < self.max_extensions):
            return None
        return longer_chains(result, kwargs.get("budget", DEFAULT_BUDGET))

    def _smaller_step(self, trainer: pl.Trainer, step: int, step_size: float, misfit: str,
                      result: LLCResult) -> None:
        """The calibration with a smaller ``step_size`` (its lengths kept), for a deferred
        snapshot whose estimate read an acceptance below the band; the later deferred snapshots
        reuse it (:meth:`_flush_deferred` restores the calibration made at ``calibrate_at``)."""
        old = self.calibration.step_size
        self.calibration = dataclasses.replace(self.calibration, step_size=float(step_size))
        self.calibrated_at = step
        self.recalibrated_at.append(step)
        if hasattr(self.calibration, "scalars"):
            log_scalars(trainer, self.calibration.scalars(), step)
        log_text(trainer, CALIBRATION_TAG,
                 f"step size refit at step {step} (an estimate deferred until calibrate_at="
                 f"{self.calibrate_at}): {misfit} (the discarded estimate read λ̂ = "
                 f"{result.mean:.4g}); step_size {old:.3g} -> {step_size:.3g}, the "
                 "calibration's chain lengths kept, for this snapshot and the deferred ones "
                 "after it", step=step)

    def _calibrate_once(self, trainer: pl.Trainer, replica: nn.Module, step: int,
                        why: str | None = None, step_sizes: list[float] | None = None) -> None:
        self.calibration = self._new_calibration(replica, step_sizes)
        self._calibrate = False
        self.calibrated_at = step
        if hasattr(self.calibration, "scalars"):
            log_scalars(trainer, self.calibration.scalars(), step)
        head = "" if why is None else f"recalibrated at step {step}: {why}\n\n"
        log_text(trainer, CALIBRATION_TAG, f"{head}```\n{self.calibration}\n```", step=step)

    def _new_calibration(self, replica: nn.Module, step_sizes: list[float] | None = None) -> Any:
        module = _calibration_module()
        kwargs = {**{k: v for k, v in self.estimate_kwargs.items() if k != "step_size"},
                  **self.calibrate_kwargs}
        if step_sizes is not None:
            kwargs["step_sizes"] = step_sizes
        return module.calibrate(replica, self.data, self.loss_fn,
                                **_accepted(module.calibrate, kwargs))

    def _deferring(self, step: int) -> bool:
        """Whether the estimate at ``step`` waits for the calibration at ``calibrate_at``."""
        return (self._calibrate and self.calibration is None and self.calibrate_at is not None
                and step < self.calibrate_at)

    def _estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        model = self._target_model(pl_module)
        if self._deferring(step):
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self._deferred.append((step, weights))
            return
        replica = self._copy(model, self.eval_mode)
        if self._calibrate and self.calibration is None:
            if not self._guarded(trainer, replica, step, calibrate_only=True):
                return
            # the calibration's own snapshot first (published after the deferred ones): where
            # its step size already reads an acceptance below the band, it is refit (smaller)
            # before the deferred estimates reuse it
            held = self._guarded(trainer, replica, step, fresh=True, publish=False)
            self._flush_deferred(trainer, pl_module)
            if isinstance(held, LLCResult):
                self._publish(trainer, step, held)
            return
        self._guarded(trainer, replica, step)

    def _flush_deferred(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Estimate the deferred weights with the calibration, in step order, at their own steps."""
        deferred, self._deferred = sorted(self._deferred, key=lambda item: item[0]), []
        model = self._target_model(pl_module)
        # a deferred snapshot the calibration does not fit is recalibrated on its own weights
        # (_misfit); that calibration serves the later deferred ones, the main one comes back after
        self._main = (self.calibration, self.calibrated_at)
        try:
            for step, weights in deferred:
                replica = self._copy(model, self.eval_mode)
                replica.load_state_dict(weights)
                self._guarded(trainer, replica, step)
        finally:
            self.calibration, self.calibrated_at = self._main
            self._main = None

    def _guarded(self, trainer: pl.Trainer, replica: nn.Module, step: int, *,
                 calibrate_only: bool = False, fresh: bool = False,
                 publish: bool = True) -> bool | LLCResult:
        """Calibrate (``calibrate_only``) or estimate and publish on ``replica``, leaving the global
        RNG states as they were; a diverging chain is skipped with a warning (or raised).
        ``fresh``: the snapshot the calibration was just made on. ``publish=False``: return the
        estimate instead of publishing it.

        Returns whether it succeeded (with ``publish=False``: the result, or False).
        """
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [replica_device] if (replica_device := _device(replica)).type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                if calibrate_only:
                    self._calibrate_once(trainer, replica, step)
                    return True
                kwargs = dict(self.estimate_kwargs)
                kwargs.setdefault("expected_calls", getattr(self, "_planned", 1))
                if self.calibration is not None:
                    kwargs["calibration"] = self.calibration
                # the Python warnings wait until it is known whether this estimate is kept
                result, caught = _held_warnings(estimate_llc, replica, self.data, self.loss_fn,
                                                **kwargs)
                misfit = self._misfit(result, step, again=fresh)
                while misfit:  # the estimate is discarded with its warnings
                    refit = getattr(_calibration_module(), "refit_step_sizes", None)
                    grid = (None if refit is None else
                            refit(result, self.calibration, self.calibrate_kwargs.get("step_sizes")))
                    if grid is None and step == self.calibrated_at:
                        break  # on the usual grid, this snapshot's calibration would come again
                    if grid is not None and self._main is not None:
                        # a deferred snapshot, far from the minimum calibrate_at waits for: its
                        # own pilots would judge it (they read low, and shrink ε far more than
                        # needed); the estimate's acceptance does, at the next smaller ε
                        self._smaller_step(trainer, step, grid[0], misfit, result)
                        kwargs["calibration"] = self.calibration
                        result, caught = _held_warnings(estimate_llc, replica, self.data,
                                                        self.loss_fn, **kwargs)
                        misfit = self._misfit(result, step, again=True)
                        continue
                    why = (f"{misfit} (the discarded estimate read λ̂ = {result.mean:.4g})"
                           + ("" if grid is None else
                              f"; the new calibration tries only smaller step sizes, from "
                              f"{grid[0]:.3g}"))
                    self._calibrate_once(trainer, replica, step, why=why, step_sizes=grid)
                    self.recalibrated_at.append(step)
                    kwargs["calibration"] = self.calibration
                    result, caught = _held_warnings(estimate_llc, replica, self.data,
                                                    self.loss_fn, **kwargs)
                    misfit = self._misfit(result, step, again=True)
                longer = self._longer(result, kwargs)
                if longer is not None:  # the chains were too short: discarded with its warnings
                    self.extended_at.append(step)
                    result, caught = _held_warnings(estimate_llc, replica, self.data,
                                                    self.loss_fn, **{**kwargs, **longer})
                _reemit(caught)
        except ChainDivergedError as exc:
            if self.on_divergence == "raise":
                raise
            what = " (its calibration diverged)" if calibrate_only else ""
            message = f"LLC estimate at step {step} skipped{what}: {exc}"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log_text(trainer, WARNINGS_TAG, message, step=step)
            return False
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            del replica
        if not publish:
            return result
        self._publish(trainer, step, result)
        return True

    def _publish(self, trainer: pl.Trainer, step: int, result: LLCResult) -> None:
        values = result.scalars()
        values.update(llc_band(values))
        log_scalars(trainer, values, step)
        if result.warnings:
            log_text(trainer, WARNINGS_TAG, "\n\n".join(result.warnings), step=step)
        self.results.append((step, result))


def _held_warnings(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list]:
    """``fn(*args, **kwargs)`` and the Python warnings it raised, held back (emitted at once if
    it raises)."""
    held: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return fn(*args, **kwargs), list(caught)
            finally:
                held = list(caught)
    except BaseException:
        _reemit(held)
        raise


def _reemit(caught: list[warnings.WarningMessage]) -> None:
    """Emit recorded warnings again, under the filters in force (their own file and line)."""
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
