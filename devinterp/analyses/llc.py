"""Local learning coefficient (LLC) estimation with SGMCMC.

Lau et al., "The Local Learning Coefficient: A Singularity-Aware Complexity Measure"
(arXiv 2308.12108). Chains sample the localized tempered posterior

    p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)

from w*, and per chain

    λ̂_c = nβ · (mean of the post-burn-in minibatch losses − L_n(w*)),

with L_n(w*) the loss on the full data. The estimate is the mean of λ̂_c over chains. Burn-in draws
are recorded separately and never averaged in.

With calibrated settings (the default) the SGLD estimate is corrected for the step size:
``λ̂_c = nβ·(mean L − L_n(w*)) − mean of ε/8·∇(nβL)·∇U`` over the draws, which removes the
Euler–Maruyama bias ``½/(1 − εa/4) − ½`` of every locally quadratic direction of curvature a
(``correction=``; docs/llc.md, "Step-size correction").
"""

from __future__ import annotations

import math
import warnings as _pywarnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from devinterp.analyses import diagnostics as diag
from devinterp.analyses.budget import DEFAULT_BUDGET, Meter, check_budget, fit_lengths
from devinterp.analyses.parallel import check_workers
from devinterp.analyses.sampling import (
    LossFn,
    ParamSelection,
    SamplingTarget,
    as_target,
    default_nbeta,
    sample_chains,
)
from devinterp.errors import (
    CalibrationWarning,
    ChainDivergedError,
    InvalidInputError,
    NotAtMinimumWarning,
)

if TYPE_CHECKING:
    from devinterp.analyses.calibration import Calibration
    from devinterp.analyses.relaxation import RelaxationCheck

#: Warn when more than this fraction of draws lies below L_n(w*).
BELOW_INIT_WARN = 0.3
#: Warn when the mean MALA acceptance lies outside this band.
ACCEPTANCE_BAND = (0.5, 0.995)
#: Warn when split R-hat exceeds this.
RHAT_WARN = 1.1
#: Warn when the second half of the draws differs from the first by more than this many
#: standard errors *and* by more than TREND_REL_WARN of the excess loss.
TREND_Z_WARN = 4.0
TREND_REL_WARN = 0.05
#: Warn when the effective sample size (all chains) is below this.
ESS_WARN = 40.0
#: How the trend warning begins (:func:`longer_chains` recognises it).
TREND_WARNING = "the loss trace is still"


@dataclass(frozen=True)
class LLCConfig:
    """The hyper-parameters an estimate used (all resolved: no None)."""

    num_chains: int
    num_draws: int
    num_burnin: int
    step_size: float
    localization: float
    nbeta: float
    batch_size: int
    sampler: str
    sampler_kwargs: tuple[tuple[str, Any], ...]
    seed: int
    device: str
    mode: str
    n: int
    num_params: int
    param_names: tuple[str, ...]
    compiled: bool = False


@dataclass(frozen=True)
class LLCDiagnostics:
    """Health of the chains behind an estimate.

    Attributes:
        rhat: split R-hat of the draws' losses (≈1 when chains agree; NaN with < 4 draws).
        ess: effective sample size of the losses, summed over chains.
        ess_per_chain: per-chain effective sample sizes.
        frac_below_init: fraction of draws with a minibatch loss below L_n(w*).
        acceptance: mean MALA acceptance probability over checked steps (NaN for SGNHT or when
            none was checked); about 0.9 is healthy.
        acceptance_per_chain: the same per chain.
        trend_z: second-half minus first-half mean of the draws, in standard errors.
        seconds: wall time of the sampling loop.
        relaxation_deficit: the fraction of its equilibrium λ̂ is predicted to miss because
            low-curvature directions have not relaxed within the chains (from the Hessian
            spectrum at w*, :mod:`devinterp.analyses.relaxation`: the full spectrum up to
            ``relaxation.MAX_PARAMS`` sampled weights, a Lanczos estimate above); NaN when not
            checked (more than ``relaxation.LANCZOS_MAX_PARAMS`` sampled weights, samplers
            other than SGLD, or no room in the budget).
    """

    rhat: float
    ess: float
    ess_per_chain: tuple[float, ...]
    frac_below_init: float
    acceptance: float
    acceptance_per_chain: tuple[float, ...]
    trend_z: float
    seconds: float
    relaxation_deficit: float = float("nan")


@dataclass(frozen=True)
class LLCResult:
    """An LLC estimate with its chains' traces and diagnostics.

    Attributes:
        mean: λ̂, the mean over chains of the per-chain estimates.
        std: standard deviation of the per-chain estimates (ddof=1; NaN with one chain).
        stderr: standard error of ``mean``: the larger of the between-chain ``std/√C`` and the
            within-chain error ``nβ·√(Σ_c Var_c/ESS_c)/C`` that accounts for autocorrelation.
        per_chain: λ̂_c for each chain.
        loss_trace: ``(chains, draws)`` minibatch losses after burn-in (read-only).
        burnin_trace: ``(chains, burn-in)`` minibatch losses during burn-in (read-only).
        init_loss: L_n(w*) on the full data.
        config: the hyper-parameters used.
        diagnostics: R-hat, ESS, draws below L_n(w*), MALA acceptance, trend.
        warnings: human-readable problems found, each with what to do.
        calibration: the :class:`~devinterp.analyses.calibration.Calibration` that set the
            hyper-parameters (``step_size="auto"`` or ``calibration=``), else None.
        cost: model evaluations this call spent (forward+backward passes of one chain on one
            minibatch: ``L_n(w*)``, calibration, chains, acceptance checks); 0 from
            :func:`summarize`.
        correction: the step-size correction subtracted from the plain estimate (the mean
            over chains and draws of ``ε/8·∇(nβL)·∇U``); 0.0 when none was applied.
        uncorrected: the plain estimate ``nβ·(mean draw loss − L_n(w*))`` (equal to ``mean``
            when no correction was applied).
        correction_trace: ``(chains, draws)`` per-step corrections, or None (read-only).
        relaxation: the slow-direction check behind ``diagnostics.relaxation_deficit``
            (:class:`~devinterp.analyses.relaxation.RelaxationCheck`), or None.
    """

    mean: float
    std: float
    stderr: float
    per_chain: tuple[float, ...]
    loss_trace: np.ndarray = field(repr=False)
    burnin_trace: np.ndarray = field(repr=False)
    init_loss: float
    config: LLCConfig
    diagnostics: LLCDiagnostics
    warnings: tuple[str, ...] = ()
    calibration: Calibration | None = field(default=None, repr=False, compare=False)
    cost: int = 0
    correction: float = 0.0
    uncorrected: float = float("nan")
    correction_trace: np.ndarray | None = field(default=None, repr=False, compare=False)
    relaxation: RelaxationCheck | None = field(default=None, repr=False, compare=False)

    def llc_trace(self) -> np.ndarray:
        """Running estimate ``nβ·(mean of draws up to t − L_n(w*))`` per chain, ``(C, draws)``
        (minus the running mean of the step-size correction when one was applied)."""
        counts = np.arange(1, self.loss_trace.shape[1] + 1)
        running = np.cumsum(self.loss_trace, axis=1) / counts
        out = self.config.nbeta * (running - self.init_loss)
        if self.correction_trace is not None:
            out = out - np.cumsum(self.correction_trace, axis=1) / counts
        return out

    def scalars(self) -> dict[str, float]:
        """Flat ``{"llc/...": value}`` for loggers (``llc/relaxation_deficit`` only when the
        slow-direction check ran)."""
        d = self.diagnostics
        out = {
            "llc/mean": self.mean,
            "llc/std": self.std,
            "llc/stderr": self.stderr,
            "llc/init_loss": self.init_loss,
            "llc/rhat": d.rhat,
            "llc/ess": d.ess,
            "llc/frac_below_init": d.frac_below_init,
            "llc/acceptance": d.acceptance,
            "llc/trend_z": d.trend_z,
            "llc/num_warnings": float(len(self.warnings)),
            "llc/correction": self.correction,
        }
        if math.isfinite(d.relaxation_deficit):  # only checked models
            out["llc/relaxation_deficit"] = d.relaxation_deficit
        return out


def _acceptance_steps(num_burnin: int, num_draws: int, checks: int | None) -> list[int]:
    if checks is None:  # the default: at most ~3% extra gradient evaluations
        checks = min(32, max(1, num_draws // 30))
    if checks <= 0:
        return []
    checks = min(checks, num_draws)
    return sorted({num_burnin + int(i) for i in np.linspace(0, num_draws - 1, checks)})


#: Defaults used when neither an argument nor a calibration gives a value.
_DEFAULTS = {"num_chains": 4, "num_draws": 800, "num_burnin": 400, "localization": 1.0}


def estimate_llc(model: nn.Module | SamplingTarget, data: Any = None, loss_fn: LossFn | None = None,
                 *, num_chains: int | None = None, num_draws: int | None = None,
                 num_burnin: int | None = None, step_size: float | str = "auto",
                 localization: float | None = None, nbeta: float | None = None,
                 batch_size: int | None = None, sampler: str = "sgld",
                 sampler_kwargs: Mapping[str, Any] | None = None, params: ParamSelection = None,
                 seed: int = 0, device: str | torch.device | None = None,
                 vectorize: bool | str = "auto", num_acceptance_checks: int | None = None,
                 check_every: int = 100, calibration: Calibration | None = None,
                 compile: bool | str = "auto", expected_calls: int = 1,
                 budget: int | None = DEFAULT_BUDGET, progress: bool | None = None,
                 workers: int | str = "auto",
                 devices: Sequence[str | torch.device] | None = None,
                 correction: bool | str = "auto") -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current weights.

    ``λ̂ = nβ·(mean post-burn-in minibatch loss − L_n(w*))`` averaged over chains; see the module
    docstring. The model's weights, ``requires_grad`` flags and train/eval mode and the global
    RNG state are left as they were.

    Hyper-parameters, in order of precedence: an explicit argument; else the ``calibration``
    given; else, with ``step_size="auto"`` (the default), a calibration made here by
    :func:`~devinterp.analyses.calibration.calibrate` from pilot chains (reported in
    ``LLCResult.calibration``); else (an explicit numeric ``step_size`` and no calibration) the
    defaults ``num_chains=4, num_draws=800, num_burnin=400, localization=1.0`` (within the default budget).

    Args:
        model: the network at w* (its current train/eval mode is used: call ``eval()`` first to
            switch off dropout), or a :class:`SamplingTarget` from ``prepare_target`` to reuse
            (then ``data``, ``loss_fn``, ``params``, ``batch_size``, ``device`` are ignored).
        data: a tensor (a dataset of its rows, e.g. token ids), a Dataset, a DataLoader or a
            tuple/dict of tensors (samples along dimension 0); see :func:`prepare_target`. Use a
            subset of the data for the data-refined LLC.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of the batch; ``batch`` has the
            structure a DataLoader over ``data`` yields. None: :func:`~devinterp.analyses.lm_loss`
            (next-token cross-entropy of a language model).
        num_chains: independent chains, each with its own noise and minibatch order.
        num_draws: steps per chain averaged into the estimate.
        num_burnin: steps per chain before the draws, recorded but never averaged.
        step_size: ε of the sampler, or ``"auto"``: from ``calibration`` or a new calibration.
        localization: γ, the strength of the pull towards w*.
        nbeta: nβ (inverse temperature × n); None: ``n / log n``, n the number of samples.
        batch_size: minibatch size; None: the DataLoader's, else ``min(n, 512)``.
        sampler: ``"sgld"``, ``"rmsprop_sgld"`` or ``"sgnht"``.
        sampler_kwargs: extra sampler options (``alpha``/``eps`` for pSGLD, ``diffusion`` for
            SGNHT).
        params: restrict sampling to some parameters (the weight-refined LLC): a name or glob
            pattern, a list of them, a predicate ``(name, param) -> bool``, or
            ``{name: bool mask}``; others stay at w*. None: all with ``requires_grad``.
        seed: seed of the chains' generators; same seed, same result.
        device: where to sample; None: the model's device.
        vectorize: ``True``: all chains in one ``torch.func.vmap`` call per step; ``False``: a
            model copy per chain; ``"auto"``: the loop on CPU, else time both on a few steps (cached per structure).
        num_acceptance_checks: post-burn-in steps (evenly spread) at which the MALA acceptance
            is estimated, each costing one extra gradient evaluation per chain (at most
            ``num_draws``); 0 disables. None (default): ``num_draws // 30`` (at least 1, at
            most 32), ~3% extra. Few checks make a noisy acceptance (each check's value is
            often exactly 1): ask for more (e.g. 16) where the acceptance warnings matter.
        check_every: check for divergence every this many steps (and at the end).
        calibration: a :class:`~devinterp.analyses.calibration.Calibration` to reuse (e.g. the
            ``result.calibration`` of an earlier snapshot of the same run); its values apply
            where no argument is given. The result warns (:class:`CalibrationWarning`) when the
            reused step size shows signs of trouble.
        compile: run the SGLD steps through ``torch.compile``: ``True``, ``False`` or
            ``"auto"`` (compile only when ``expected_calls`` estimates of this structure pay for
            the one-time compile; a deterministic rule, see ``docs/llc.md``). Falls back to
            eager with a warning when compiling is unavailable or fails. Compiled and eager
            results agree up to floating-point reassociation.
        expected_calls: how many estimates of this model structure this process will make
            (e.g. the number of snapshots); the hint for ``compile="auto"``.
        budget: the most model evaluations (forward+backward passes of one chain on one
            minibatch) this call may cost, calibration, ``L_n(w*)``, chains and acceptance
            checks together (default 5,000, whatever the model's size; None: no limit). The
            calibration plans within it; chain lengths that are not given explicitly are cut
            to fit it (fewer, longer chains first, see ``docs/llc.md``), and when it binds,
            ``warnings`` say so with the effective sample size and stderr reached and the
            budget that would reach the calibration's target. Explicit ``num_chains``,
            ``num_draws``, ``num_burnin`` are never cut.
        progress: a progress bar with an ETA on stderr (shown once the work has run 2 s) and
            the plan announced first; None: when stderr is a terminal.
        workers: run the chains on this many cores (``"auto"``: every core when the run takes
            a second or more; 1: one after the other in this thread). The estimate does not
            depend on it (docs/llc.md, "Parallel chains").
        devices: spread the chains over several devices, e.g. ``["cuda:0", "cuda:1"]``.
        correction: subtract the step-size correction ``ε/8·∇(nβL)·∇U`` (averaged over the
            draws) from the estimate: ``True``, ``False``, or ``"auto"`` (the default: when the
            step size is calibrated, i.e. ``step_size="auto"`` or ``calibration=`` given;
            an explicit ``step_size`` gives the plain estimator of Lau et al. unless
            ``correction=True``). SGLD only, and not on the lean path (≥ 2²⁰ sampled
            coordinates), where the plain estimate is returned. ``LLCResult.uncorrected``
            keeps the plain one (docs/llc.md, "Step-size correction").

    Returns:
        An :class:`LLCResult`.

    Raises:
        InvalidInputError: bad data, loss, parameter selection or hyper-parameter.
        ChainDivergedError: a chain's loss became non-finite or exploded; it names the chain,
            the step and a smaller step size to try.
    """
    for name, value in (("num_draws", num_draws), ("num_burnin", num_burnin),
                        ("num_acceptance_checks", num_acceptance_checks)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, np.integer))):
            raise InvalidInputError(f"{name} must be an int, got {value!r}")
    if num_draws is not None and num_draws <= 0:
        raise InvalidInputError(f"num_draws must be > 0, got {num_draws}")
    if num_burnin is not None and num_burnin < 0:
        raise InvalidInputError(f"num_burnin must be >= 0, got {num_burnin}")
    check_workers(workers)
    if correction not in (True, False, "auto"):
        raise InvalidInputError(f"correction must be True, False or 'auto', got {correction!r}")
    auto = isinstance(step_size, str)
    if auto and step_size != "auto":
        raise InvalidInputError(f"step_size must be a number or 'auto', got {step_size!r}")
    if not auto and (isinstance(step_size, bool) or not isinstance(step_size, (int, float, np.number))
                     or not math.isfinite(step_size) or step_size <= 0):
        raise InvalidInputError(f"step_size must be a finite number > 0 (or 'auto'), got {step_size!r}: "
                                f"with step_size=0 the chain never moves and the LLC reads 0")
    if calibration is not None:
        from devinterp.analyses.calibration import Calibration

        if not isinstance(calibration, Calibration):
            raise InvalidInputError("calibration must be a Calibration (from calibrate() or "
                                    f"LLCResult.calibration), got {type(calibration).__name__}")
    budget = check_budget(budget)
    prepared = isinstance(model, SamplingTarget)
    target = as_target(model, data, loss_fn, caller="estimate_llc", params=params, batch_size=batch_size,
                       device=device, vectorize=vectorize, compile=compile,
                       expected_calls=expected_calls)
    meter = Meter(budget, progress=progress, desc="estimate_llc")
    if not prepared:  # L_n(w*), computed by prepare_target in chunks
        meter.add(_init_loss_cost(target))
    reused = calibration is not None
    with meter:
        # before the calibration (its pilots' share of the budget is unchanged), which then
        # fills what the budget leaves after both; the spectrum's cost is counted after it
        eigenvalues, spectrum_weights, spectrum_cost = _relaxation_spectrum(target, sampler,
                                                                            budget, seed)
        if calibration is None and auto:
            from devinterp.analyses.calibration import calibrate

            calibration = calibrate(target, localization=localization or _DEFAULTS["localization"],
                                    nbeta=nbeta, sampler=sampler, sampler_kwargs=sampler_kwargs,
                                    num_chains=num_chains, seed=seed,
                                    compile=compile, expected_calls=expected_calls,
                                    budget=budget, progress=progress, _meter=meter,
                                    _reserve=spectrum_cost)
        meter.add(spectrum_cost)
        chosen = dict(_DEFAULTS) if calibration is None else calibration.estimate_kwargs()
        given = {"num_chains": num_chains, "num_draws": num_draws, "num_burnin": num_burnin,
                 "localization": localization, "nbeta": nbeta,
                 "step_size": None if auto else step_size}
        chosen.update({k: v for k, v in given.items() if v is not None})
        wanted = (chosen["num_chains"], chosen["num_burnin"], chosen["num_draws"])
        spent_before = meter.used
        fitted = _fit_budget(wanted, meter.remaining(), num_chains=num_chains,
                             num_burnin=num_burnin, num_draws=num_draws,
                             num_checks=num_acceptance_checks)
        num_chains, num_burnin, num_draws = fitted
        step_size, localization = chosen["step_size"], chosen["localization"]
        nbeta = chosen.get("nbeta")
        nbeta = default_nbeta(target.n) if nbeta is None else nbeta
        cut = (num_chains, num_burnin, num_draws) != tuple(wanted)  # by the budget
        replanned = None
        if (eigenvalues is not None and auto and not reused and calibration is not None
                and (calibration.ok or _only_plateau_missing(calibration))
                and all(v is None for v in (given["num_chains"], given["num_burnin"],
                                            given["num_draws"], given["localization"]))):
            replanned = _replan(eigenvalues, calibration, nbeta, step_size, localization,
                                num_chains, num_burnin, num_draws, spectrum_weights)
            if replanned is not None:
                num_chains, num_burnin, num_draws, step_size, _ = replanned
        checks = _acceptance_steps(num_burnin, num_draws, num_acceptance_checks)
        meter.plan(meter.used + num_chains * (num_burnin + num_draws + len(checks)))
        why = ("calibrated" if calibration is not None and not reused else
               "from the calibration given" if reused else "given")
        if not auto:
            why = "given"
        if replanned is not None:
            why += ", re-planned as one longer chain for slow directions"
        meter.say(f"estimate_llc: {num_chains} chains × ({num_burnin} burn-in + {num_draws} "
                  f"draws) steps, step_size={step_size:.3g} ({why}), localization="
                  f"{localization:g}, nbeta={nbeta:.4g}, batch {target.batch_size} of n="
                  f"{target.n}: {num_chains * (num_burnin + num_draws + len(checks)):,} model "
                  "evaluations" + ("" if budget is None else
                                   f" ({meter.used:,} spent, budget {budget:,})"))
        try:
            traces = sample_chains(
                target, num_chains=num_chains, num_steps=num_burnin + num_draws,
                step_size=step_size, localization=localization, nbeta=nbeta, sampler=sampler,
                seed=seed, sampler_kwargs=sampler_kwargs, acceptance_steps=checks,
                check_every=check_every, on_divergence="raise", compile=compile,
                expected_calls=expected_calls, on_progress=meter.add,
                workers=workers, devices=devices)
        except ChainDivergedError as exc:
            if not reused:
                raise
            raise ChainDivergedError(
                f"{exc} — with step_size={step_size:g} from a reused calibration: the loss scale or "
                "curvature has changed since it was made; calibrate again at this snapshot "
                "(estimate_llc(..., step_size='auto'))", chain=exc.chain, step=exc.step,
                suggested_step_size=exc.suggested_step_size) from exc
    config = LLCConfig(
        num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
        step_size=float(step_size), localization=float(localization), nbeta=float(nbeta),
        batch_size=target.batch_size, sampler=sampler,
        sampler_kwargs=tuple(sorted((sampler_kwargs or {}).items())), seed=seed,
        device=str(target.device), mode=target.mode, n=target.n,
        num_params=target.num_selected, param_names=target.param_names,
        compiled=traces.compiled)
    correct = (correction is True
               or (correction == "auto" and (auto or reused) and calibration is not None))
    result = summarize(traces.losses, target.init_loss, config, acceptance=traces.acceptance,
                       seconds=traces.seconds,
                       corrections=traces.corrections if correct else None)
    result = replace(result, cost=meter.used)
    if eigenvalues is not None:
        result = _with_relaxation(result, eigenvalues, spent_before, spectrum_weights,
                                  spectrum_cost)
    if replanned is not None:
        result = replace(result, warnings=result.warnings + (replanned[4],))
    if cut:
        result = replace(result, warnings=result.warnings + (_budget_warning(
            result, budget, wanted, spent_before, len(checks), calibration),))
    return _finish(result, calibration, reused=reused)


def _relaxation_spectrum(target: SamplingTarget, sampler: str, budget: int | None, seed: int
                         ) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """The spectrum of ∇²L_n(w*) for the slow-direction check — ``(eigenvalues, None, cost)``
    for small models, ``(Lanczos nodes, their weights, cost)`` for larger ones — when the model
    is not too large and the spectrum fits in the budget; cost in model evaluations."""
    from devinterp.analyses import relaxation

    cost = relaxation.spectrum_cost(target)
    if (sampler != "sgld" or target.num_selected > relaxation.LANCZOS_MAX_PARAMS
            or (budget is not None and cost > relaxation.MAX_BUDGET_SHARE * budget)):
        return None, None, 0
    if target.num_selected > relaxation.MAX_PARAMS:
        nodes, weights = relaxation.lanczos_spectrum(target, seed=seed)
        return (nodes, weights, cost) if len(nodes) else (None, None, cost)
    eigenvalues = relaxation.hessian_eigenvalues(target)
    return (eigenvalues if len(eigenvalues) else None), None, cost


def _only_plateau_missing(calibration: Calibration) -> bool:
    """A fallback whose step size met every criterion but the plateau (slow directions: the
    spectrum check may re-plan it as it would a successful calibration)."""
    from devinterp.analyses.calibration import only_plateau_missing

    return only_plateau_missing(calibration)


def _replan(eigenvalues: np.ndarray, calibration: Calibration, nbeta: float, step_size: float,
            localization: float, num_chains: int, num_burnin: int, num_draws: int,
            weights: np.ndarray | None = None):
    """One longer chain (at up to ε·h_max = 1) when the calibrated split is too slow."""
    from devinterp.analyses import relaxation

    curvature = getattr(calibration, "curvature", 0.0) or 0.0
    top = 1.0 / curvature if curvature > 0 else step_size
    return relaxation.replan(eigenvalues, nbeta=nbeta, step_size=step_size,
                             localization=localization, num_chains=num_chains,
                             num_burnin=num_burnin, num_draws=num_draws, max_step_size=top,
                             weights=weights)


def _with_relaxation(result: LLCResult, eigenvalues: np.ndarray, spent: int,
                     weights: np.ndarray | None = None, cost: int = 0) -> LLCResult:
    """Attach the slow-direction check and warn when the draws are predicted to read low."""
    from devinterp.analyses import relaxation

    c = result.config
    check = relaxation.check_relaxation(eigenvalues, nbeta=c.nbeta, step_size=c.step_size,
                                        localization=c.localization, num_burnin=c.num_burnin,
                                        num_draws=c.num_draws, cost=cost, weights=weights)
    warnings = result.warnings
    if check.deficit > relaxation.DEFICIT_WARN:
        warnings = warnings + (check.message(c.num_chains, c.num_burnin, c.num_draws, spent,
                                             c.step_size),)
    return replace(result, relaxation=check, warnings=warnings,
                   diagnostics=replace(result.diagnostics, relaxation_deficit=check.deficit))


def _init_loss_cost(target: SamplingTarget) -> int:
    """Model evaluations of ``L_n(w*)`` (the full data in chunks)."""
    return math.ceil(target.n / max(min(target.batch_size, target.eval_batch_size), 1))


def _fit_budget(wanted: tuple[int, int, int], available: float, *, num_chains: int | None,
                num_burnin: int | None, num_draws: int | None,
                num_checks: int | None) -> tuple[int, int, int]:
    """Fit the lengths not given explicitly into ``available`` model evaluations."""
    c, b, d = wanted
    if not math.isfinite(available) or None not in (num_chains, num_burnin, num_draws):
        return c, b, d
    frac = (1 / 30 if num_checks is None  # the default: num_draws // 30 checks
            else 0.0 if num_checks <= 0 else min(1.0, num_checks / max(d, 1)))
    fc, fb, fd = fit_lengths(c, b, d, available, min_chains=min(2, c) if num_chains is None else c,
                             check_fraction=frac)
    # explicit values win over the budget
    return (num_chains or fc, b if num_burnin is not None else fb,
            d if num_draws is not None else fd)


def _budget_warning(result: LLCResult, budget: int | None, wanted: tuple[int, int, int],
                    spent_before: int, checks: int, calibration: Calibration | None) -> str:
    """The warning of an estimate whose lengths the budget cut."""
    c0, b0, d0 = wanted
    cfg, d = result.config, result.diagnostics
    frac = checks / max(cfg.num_draws, 1)
    needed = spent_before + int(math.ceil(c0 * (b0 + d0 * (1 + frac))))
    needed = int(math.ceil(needed / 100.0) * 100)
    target = getattr(calibration, "target_ess", None)
    aim = f" (target {target:.0f})" if target else ""
    cut = (f"; the burn-in was cut from {b0} steps: λ̂ may be biased low"
           if cfg.num_burnin < b0 else "")
    return (f"the budget of {budget:,} model evaluations bound: {cfg.num_chains} chains × "
            f"({cfg.num_burnin} burn-in + {cfg.num_draws} draws) instead of the {c0} × ({b0} + "
            f"{d0}) wanted; effective sample size {d.ess:.0f}{aim}, stderr {result.stderr:.3g}"
            f" ({result.stderr / max(abs(result.mean), 1e-12):.1%} of λ̂){cut}. "
            f"budget={needed} would reach the target")


def _finish(result: LLCResult, calibration: Calibration | None, *, reused: bool) -> LLCResult:
    """Attach the calibration, add its warnings and emit the Python warnings."""
    from devinterp.analyses.calibration import minimum_warning, reuse_warning

    extra: list[tuple[str, type[Warning]]] = []
    if calibration is not None and not reused:
        extra += [(w, CalibrationWarning) for w in calibration.warnings]
    if calibration is not None and reused:
        text = reuse_warning(result, calibration)
        if text:
            extra.append((text, CalibrationWarning))
    text = minimum_warning(result)
    if text:
        extra.append((text, NotAtMinimumWarning))
    for text, category in extra:
        _pywarnings.warn(text, category, stacklevel=3)
    return replace(result, warnings=result.warnings + tuple(t for t, _ in extra),
                   calibration=calibration)


def summarize(losses: np.ndarray, init_loss: float, config: LLCConfig, *,
              acceptance: np.ndarray | None = None, seconds: float = 0.0,
              corrections: np.ndarray | None = None) -> LLCResult:
    """Turn ``(chains, burn-in + draws)`` loss traces into an :class:`LLCResult`.

    Args:
        losses: every recorded minibatch loss, burn-in first (must be finite).
        init_loss: L_n(w*).
        config: the hyper-parameters (``num_burnin`` splits the trace).
        acceptance: ``(checks, chains)`` MALA acceptance probabilities, or None.
        seconds: sampling wall time, kept in the diagnostics.
        corrections: ``(chains, burn-in + draws)`` step-size corrections ``ε/8·∇(nβL)·∇U``
            (``ChainTraces.corrections``) to subtract, or None for the plain estimate.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if not np.isfinite(losses).all():
        raise InvalidInputError("loss traces contain non-finite values; they are never averaged")
    burn = losses[:, :config.num_burnin].copy()
    draws = losses[:, config.num_burnin:].copy()
    if draws.shape[1] == 0:
        raise InvalidInputError("no draws after burn-in")
    nbeta = config.nbeta
    chains = draws.shape[0]
    plain = nbeta * (draws.mean(axis=1) - init_loss)
    # per-step contributions to λ̂ (the plain ones, less the step-size correction when given)
    series = nbeta * draws
    corr = None
    if corrections is not None:
        corr = np.asarray(corrections, dtype=np.float64)[:, config.num_burnin:].copy()
        if corr.shape != draws.shape or not np.isfinite(corr).all():
            raise InvalidInputError("corrections must be finite and shaped like the losses")
        series = series - corr
    per_chain = plain if corr is None else plain - corr.mean(axis=1)
    mean = float(per_chain.mean())
    std = float(per_chain.std(ddof=1)) if chains > 1 else float("nan")
    ess_chain = np.array([diag.effective_sample_size(row) for row in draws])
    ess_series = ess_chain if corr is None else np.array(
        [diag.effective_sample_size(row) for row in series])
    var_within = np.array([row.var(ddof=1) if len(row) > 1 else 0.0 for row in series])
    se_within = math.sqrt(float((var_within / np.maximum(ess_series, 1.0)).sum())) / chains
    se_between = std / math.sqrt(chains) if chains > 1 else 0.0
    stderr = float(max(se_within, se_between))
    rhat = diag.split_rhat(draws)
    frac_below = float((draws < init_loss).mean())
    if acceptance is not None and len(acceptance):
        acc_chain = tuple(float(x) for x in np.asarray(acceptance).mean(axis=0))
        acc = float(np.mean(acceptance))
    else:
        acc_chain, acc = tuple(float("nan") for _ in range(chains)), float("nan")
    trend = diag.trend_zscore(draws)
    diagnostics = LLCDiagnostics(
        rhat=rhat, ess=float(ess_chain.sum()), ess_per_chain=tuple(float(e) for e in ess_chain),
        frac_below_init=frac_below, acceptance=acc, acceptance_per_chain=acc_chain,
        trend_z=trend, seconds=float(seconds))
    warnings = _warnings(mean, per_chain, draws, init_loss, config, diagnostics)
    burn.flags.writeable = False
    draws.flags.writeable = False
    if corr is not None:
        corr.flags.writeable = False
    return LLCResult(mean=mean, std=std, stderr=stderr, per_chain=tuple(float(x) for x in per_chain),
                     loss_trace=draws, burnin_trace=burn, init_loss=float(init_loss),
                     config=config, diagnostics=diagnostics, warnings=tuple(warnings),
                     correction=0.0 if corr is None else float(corr.mean()),
                     uncorrected=float(plain.mean()), correction_trace=corr)


def _warnings(mean: float, per_chain: np.ndarray, draws: np.ndarray, init_loss: float,
              config: LLCConfig, d: LLCDiagnostics) -> list[str]:
    out = []
    eps = config.step_size
    if mean < 0:
        out.append(f"the LLC estimate is negative ({mean:.4g}): w* is not a local minimum or the "
                   "chains are still descending; train longer, increase localization, or check "
                   "that the data and loss match those w* was trained on")
    elif (per_chain < 0).any():
        out.append(f"{int((per_chain < 0).sum())} chain(s) gave a negative estimate: "
                   "increase num_draws or localization")
    if d.frac_below_init > BELOW_INIT_WARN:
        out.append(f"{d.frac_below_init:.0%} of draws lie below L(w*): SGLD is still finding "
                   "lower loss (w* is not a minimum) or minibatch noise dominates; increase "
                   "localization or batch_size, or train w* further")
    if math.isfinite(d.acceptance):
        lo, hi = ACCEPTANCE_BAND
        if d.acceptance < lo:
            out.append(f"MALA acceptance {d.acceptance:.2f} < {lo}: step_size={eps:g} is too "
                       f"large for this posterior; try step_size={eps / 4:g}")
        elif d.acceptance > hi:
            out.append(f"MALA acceptance {d.acceptance:.3f} > {hi}: step_size={eps:g} may be "
                       f"needlessly small (slow mixing); try step_size={eps * 4:g} and check "
                       "that the estimate is stable")
    if math.isfinite(d.rhat) and d.rhat > RHAT_WARN:
        out.append(f"split R-hat {d.rhat:.2f} > {RHAT_WARN}: chains disagree or drift; run more "
                   "burn-in/draws or increase localization")
    excess = abs(float(draws.mean()) - init_loss)
    half = draws.shape[1] // 2
    rel = abs(draws[:, -half:].mean() - draws[:, :half].mean()) / excess if excess > 0 else 0.0
    if abs(d.trend_z) > TREND_Z_WARN and rel > TREND_REL_WARN:
        direction = "rising" if d.trend_z > 0 else "falling"
        out.append(f"{TREND_WARNING} {direction} during the draws (z={d.trend_z:.1f}, "
                   f"{rel:.0%} of the excess loss): increase num_burnin or step_size")
    if d.ess < ESS_WARN:
        out.append(f"effective sample size {d.ess:.0f} < {ESS_WARN:.0f}: the stderr is "
                   "unreliable; increase num_draws or step_size")
    return out


def longer_chains(result: LLCResult, budget: int | None) -> dict[str, int] | None:
    """Twice ``result``'s burn-in and draws when its own diagnostics say its chains were too
    short (split R-hat above :data:`RHAT_WARN`, an effective sample size below :data:`ESS_WARN`
    or the trend warning) and the longer run fits ``budget`` (None: no limit); else None.
    ``LLCCallback(max_extensions=)`` uses it."""
    d, cfg = result.diagnostics, result.config
    short = ((math.isfinite(d.rhat) and d.rhat > RHAT_WARN) or d.ess < ESS_WARN
             or any(w.startswith(TREND_WARNING) for w in result.warnings))
    extra = cfg.num_chains * (cfg.num_burnin + cfg.num_draws)
    if not short or (budget is not None and result.cost + extra > budget):
        return None
    return {"num_burnin": 2 * cfg.num_burnin, "num_draws": 2 * cfg.num_draws}
