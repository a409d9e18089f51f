"""Automatic choice of the SGLD hyper-parameters of an LLC estimate.

Short pilot chains run on a log grid of step sizes ε around a curvature scale of the posterior,
and a step size is chosen by documented criteria (see ``docs/calibration.md``):

1. **Grid.** The largest curvature of the potential ``U = nβ·L_n + γ/2‖w − w*‖²`` at w*,
   ``h = nβ·μ_max(∇²L_n(w*)) + γ`` (power iteration on finite-difference Hessian-vector
   products), sets the top of the grid at ``ε_top = grid_top / h`` (SGLD on a quadratic is stable
   for ``ε·h < 4``); the grid goes down by factors of 2.
2. **Per step size** (``PilotRow``): divergence; the MALA acceptance of the moves; the fraction of
   draws below ``L_n(w*)``; the burn-in read from the loss trace (:func:`burnin_length`); λ̂ of the
   post-burn-in part; and the *drift* against the next smaller step size compared over the same
   stretch of Langevin time ``τ = ε·t`` (so that a slower chain is not mistaken for a less
   biased one).
3. **Choice:** the largest ε with no divergence, acceptance ≥ ``min_acceptance``, at most
   ``max_below`` of the draws below ``L_n(w*)``, λ̂ > 0 and a drift against ε/2 within
   ``drift_tol`` plus noise. Too large an ε biases λ̂ upwards (for a quadratic direction of
   curvature ``a = nβ·L''`` the stationary excess is ``a/(2h(1 − εh/4))`` instead of ``a/(2h)``),
   which lowers the acceptance and shows as drift; too small an ε leaves the chain near w*.
4. **Length.** The burn-in is measured in Langevin time on the pilot of a larger step (it relaxes
   faster in steps) and converted to steps at the chosen ε; the draws give about
   ``target_ess`` effective samples from the pilot's integrated autocorrelation time.

If no step size passes and the draws fall below ``L_n(w*)`` (w* is not a minimum), the
localization γ is raised tenfold (at most ``max_localization_rounds`` times).

The :class:`Calibration` holds the table, the choice and the reason in words; it round-trips
through JSON (``to_dict``/``from_dict``, ``save``/``load``) so one calibration can be reused for
every snapshot of a run (``estimate_llc(..., calibration=cal)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from devinterp.analyses import diagnostics as diag
from devinterp.analyses.budget import DEFAULT_BUDGET, Meter, check_budget
from devinterp.analyses.sampling import (
    LossFn,
    ParamSelection,
    SamplingTarget,
    as_target,
    default_nbeta,
    sample_chains,
)
from devinterp.errors import InvalidInputError

#: Version of the JSON layout written by :meth:`Calibration.to_dict`.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PilotRow:
    """What the pilot chains at one (step size, localization) showed.

    Attributes:
        step_size: ε.
        localization: γ.
        llc: λ̂ from the post-burn-in part of the pilot (NaN if it diverged).
        stderr: its standard error (between-chain and autocorrelation-aware within-chain).
        burnin: steps until the loss trace reached its plateau (see :func:`burnin_length`).
        plateau: whether the plateau was reached in the first two thirds of the pilot.
        acceptance: mean MALA acceptance of the moves checked after the burn-in (the stretch the
            draws come from; the second half without a plateau), NaN if none. The moves of the
            burn-in are left out: they start at w*, whose curvature can be far sharper than the
            posterior's bulk (a trained network), and would make the acceptance reflect how long
            the chain stayed near w* rather than the step size's discretisation error.
        frac_below: fraction of post-burn-in draws below ``L_n(w*)``.
        drift: relative difference of the excess loss against the next smaller step size over the
            same Langevin time (NaN for the smallest step or when either diverged).
        drift_stderr: the noise of ``drift``.
        tau_int: integrated autocorrelation time of the post-burn-in losses, in steps.
        diverged: whether a chain diverged (then ``diverged_step`` says when).
        diverged_step: the step of the divergence, or -1.
        seconds: wall time of the pilot.
        acceptance_stderr: standard error of ``acceptance`` (spread of the per-check means over
            the chains, divided by the square root of the number of checks); NaN if fewer than
            two checks.
    """

    step_size: float
    localization: float
    llc: float
    stderr: float
    burnin: int
    plateau: bool
    acceptance: float
    frac_below: float
    drift: float
    drift_stderr: float
    tau_int: float
    diverged: bool
    diverged_step: int
    seconds: float
    acceptance_stderr: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN written as None)."""
        return {k: _json_float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PilotRow:
        """Inverse of :meth:`to_dict`."""
        kw = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in d:
                if f.default is not MISSING:  # a field added later (older JSON lacks it)
                    kw[name] = f.default
                    continue
                raise InvalidInputError(f"calibration row lacks {name!r}: {dict(d)}")
            v = d[name]
            if f.type in ("float",):
                kw[name] = float("nan") if v is None else float(v)
            elif f.type == "int":
                kw[name] = int(v)
            elif f.type == "bool":
                kw[name] = bool(v)
            else:
                kw[name] = v
        return cls(**kw)


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate`: the chosen hyper-parameters, the table and the reason.

    Attributes:
        step_size: the chosen ε.
        localization: the chosen γ.
        nbeta: nβ used (``n / log n`` unless given).
        num_burnin: steps of burn-in per chain for the estimate.
        num_draws: steps per chain averaged into the estimate.
        num_chains: chains the estimate should run.
        batch_size: minibatch size the pilots used.
        sampler: the sampler calibrated (``"sgld"`` or ``"rmsprop_sgld"``).
        n: number of samples of the data.
        init_loss: ``L_n(w*)`` where it was calibrated.
        curvature: h, the largest curvature of the potential at w* (sets the grid).
        ok: whether some step size met every criterion.
        reason: the choice in words.
        table: one :class:`PilotRow` per (ε, γ) tried, largest ε first per γ.
        seed: the seed of the pilots.
        seconds: wall time of the calibration.
        warnings: problems found, each with what to do.
    """

    step_size: float
    localization: float
    nbeta: float
    num_burnin: int
    num_draws: int
    num_chains: int
    batch_size: int
    sampler: str
    n: int
    init_loss: float
    curvature: float
    ok: bool
    reason: str
    table: tuple[PilotRow, ...] = field(repr=False)
    seed: int = 0
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()
    #: effective samples (all chains) ``num_draws`` aims for (0: unknown, an older calibration).
    target_ess: float = 0.0
    #: model evaluations the calibration spent (curvature probe and pilots).
    cost: int = 0
    #: the budget it planned within (None: none).
    budget: int | None = None

    # ---- use -----------------------------------------------------------------------------
    def estimate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``estimate_llc`` this calibration sets."""
        return {"step_size": self.step_size, "localization": self.localization,
                "nbeta": self.nbeta, "num_burnin": self.num_burnin,
                "num_draws": self.num_draws, "num_chains": self.num_chains}

    def chosen_row(self) -> PilotRow | None:
        """The table row of the chosen step size and localization."""
        for row in self.table:
            if row.step_size == self.step_size and row.localization == self.localization:
                return row
        return None

    def scalars(self) -> dict[str, float]:
        """Flat ``{"calibration/...": value}`` for loggers."""
        row = self.chosen_row()
        return {
            "calibration/step_size": self.step_size,
            "calibration/localization": self.localization,
            "calibration/nbeta": self.nbeta,
            "calibration/num_burnin": float(self.num_burnin),
            "calibration/num_draws": float(self.num_draws),
            "calibration/curvature": self.curvature,
            "calibration/ok": float(self.ok),
            "calibration/pilot_llc": row.llc if row else float("nan"),
            "calibration/pilot_acceptance": row.acceptance if row else float("nan"),
            "calibration/seconds": self.seconds,
            "calibration/num_warnings": float(len(self.warnings)),
        }

    # ---- text ----------------------------------------------------------------------------
    def table_text(self) -> str:
        """The table as aligned text, the chosen row marked with ``*``."""
        head = (f"{'':1} {'step_size':>10} {'gamma':>7} {'llc':>9} {'stderr':>8} {'burnin':>7} "
                f"{'accept':>7} {'below':>6} {'drift':>7} {'tau':>6}  status")
        lines = [head]
        for row in self.table:
            mark = "*" if (row.step_size == self.step_size
                           and row.localization == self.localization) else " "
            status = f"diverged@{row.diverged_step}" if row.diverged else (
                "ok" if row.plateau else "no plateau")
            lines.append(
                f"{mark} {row.step_size:>10.3g} {row.localization:>7.3g} {_f(row.llc, 9, '.3f')} "
                f"{_f(row.stderr, 8, '.3f')} {row.burnin:>7d} {_f(row.acceptance, 7, '.3f')} "
                f"{_f(row.frac_below, 6, '.2f')} {_f(row.drift, 7, '+.2f')} "
                f"{_f(row.tau_int, 6, '.1f')}  {status}")
        return "\n".join(lines)

    def __str__(self) -> str:
        chosen = (f"step_size={self.step_size:.3g} localization={self.localization:g} "
                  f"nbeta={self.nbeta:.4g} num_burnin={self.num_burnin} "
                  f"num_draws={self.num_draws} num_chains={self.num_chains}")
        parts = [self.table_text(), "", "chosen: " + chosen, "reason: " + self.reason]
        parts += ["warning: " + w for w in self.warnings]
        return "\n".join(parts)

    # ---- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :meth:`from_dict`)."""
        d = {k: _json_float(v) for k, v in asdict(self).items() if k not in ("table", "warnings")}
        d["table"] = [row.to_dict() for row in self.table]
        d["warnings"] = list(self.warnings)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Rebuild a calibration from :meth:`to_dict` output.

        Raises:
            InvalidInputError: a field is missing or the format version is unknown.
        """
        if not isinstance(d, Mapping):
            raise InvalidInputError(f"a calibration dict is needed, got {type(d).__name__}")
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise InvalidInputError(f"calibration format version {version} is not supported "
                                    f"(this library reads {FORMAT_VERSION}); re-run calibrate")
        ints = {"num_burnin", "num_draws", "num_chains", "batch_size", "n", "seed", "cost"}
        kw: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in d:
                if f.default is not MISSING:  # a field added later (older JSON lacks it)
                    continue
                raise InvalidInputError(f"calibration dict lacks {name!r}")
            v = d[name]
            if name == "budget":
                kw[name] = None if v is None else int(v)
            elif name == "table":
                kw[name] = tuple(PilotRow.from_dict(r) for r in v)
            elif name == "warnings":
                kw[name] = tuple(str(w) for w in v)
            elif name in ints:
                kw[name] = int(v)
            elif name in ("sampler", "reason"):
                kw[name] = str(v)
            elif name == "ok":
                kw[name] = bool(v)
            else:
                kw[name] = float("nan") if v is None else float(v)
        return cls(**kw)

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Inverse of :meth:`to_json`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"not a calibration JSON: {exc}") from exc
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path``."""
        with open(path, "w") as fh:
            fh.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a calibration written by :meth:`save`."""
        with open(path) as fh:
            return cls.from_json(fh.read())

    # ---- plots ---------------------------------------------------------------------------
    def figure(self) -> Any:
        """A matplotlib figure: pilot λ̂ (± 2 stderr) and acceptance against ε, choice marked."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
        for gamma in sorted({r.localization for r in self.table}):
            rows = sorted((r for r in self.table if r.localization == gamma),
                          key=lambda r: r.step_size)
            ok = [r for r in rows if not r.diverged]
            eps = [r.step_size for r in ok]
            ax.errorbar(eps, [r.llc for r in ok], yerr=[2 * r.stderr for r in ok], marker="o",
                        capsize=3, label=f"pilot λ̂ (γ={gamma:g})")
            for r in rows:
                if r.diverged:
                    ax.axvline(r.step_size, color="red", alpha=0.3, ls=":")
            ax2.plot(eps, [r.acceptance for r in ok], marker="o", label=f"γ={gamma:g}")
        ax.axvline(self.step_size, color="k", ls="--", label=f"chosen ε={self.step_size:.3g}")
        ax2.axvline(self.step_size, color="k", ls="--")
        ax.set_xscale("log")
        ax.set_ylabel("λ̂ (pilot)")
        ax.set_title("calibration: λ̂ against step size" + ("" if self.ok else " (no ε passed)"))
        ax.legend(fontsize=8)
        ax2.set_xlabel("step size ε")
        ax2.set_ylabel("MALA acceptance")
        ax2.set_ylim(0, 1.02)
        fig.tight_layout()
        return fig

    def plot(self, path: str | os.PathLike) -> None:
        """Save :meth:`figure` as an image (PNG by the file's extension)."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def log_tensorboard(self, writer: Any, step: int = 0, tag: str = "calibration") -> None:
        """Write the figure (``add_figure``), the table's λ̂/acceptance per ε and the choice.

        Args:
            writer: a ``torch.utils.tensorboard.SummaryWriter``.
            step: the global step to log at (e.g. the training step calibrated).
            tag: prefix of the tags.
        """
        for key, value in self.scalars().items():
            writer.add_scalar(key.replace("calibration", tag, 1), value, step)
        rows = sorted(self.table, key=lambda r: (r.localization, r.step_size))
        for i, row in enumerate(rows):
            if not row.diverged:
                # one curve over the grid index: λ̂ and acceptance per step size
                writer.add_scalar(f"{tag}/grid_llc", row.llc, i)
                writer.add_scalar(f"{tag}/grid_acceptance", row.acceptance, i)
                writer.add_scalar(f"{tag}/grid_log10_step_size", math.log10(row.step_size), i)
        writer.add_figure(f"{tag}/llc_vs_step_size", self.figure(), step, close=True)
        writer.add_text(f"{tag}/table", "    " + str(self).replace("\n", "\n    "), step)


def _f(value: float, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if not math.isfinite(value) else format(value, spec).rjust(width)


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------------------------
# trace analysis (pure numpy)
# --------------------------------------------------------------------------------------------
def burnin_length(losses: np.ndarray, *, num_blocks: int = 20, z: float = 3.0,
                  rel_tol: float = 0.03) -> tuple[int, bool]:
    """Steps until a loss trace reaches its plateau.

    The ``(chains, T)`` trace (averaged over chains) is cut into ``num_blocks`` blocks. The
    final level F is the mean of the last third of the blocks and its noise s the standard
    deviation of those block means, estimated from successive differences (a trend is not noise). The burn-in ends at the first block from which every later
    block mean stays within ``max(z·s, rel_tol·|F − first block|)`` of F.

    Returns:
        ``(burn-in in steps, plateau)``: plateau is False when the trace only settles in the
        last third (the pilot was too short to see the plateau).
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    t = x.shape[1]
    blocks = min(num_blocks, max(t // 4, 1))
    if blocks < 6:
        return t // 2, False
    size = t // blocks
    means = x[:, :size * blocks].mean(axis=0).reshape(blocks, size).mean(axis=1)
    tail = means[-(blocks // 3):]
    final = float(tail.mean())
    # noise of one block mean from successive differences, so that a trend in the tail does not
    # count as noise
    noise = float(np.diff(tail).std(ddof=1) / math.sqrt(2)) if len(tail) > 2 else float(tail.std())
    tol = max(z * noise, rel_tol * abs(final - means[0]), 1e-12 * max(abs(final), 1.0))
    inside = np.abs(means - final) <= tol
    start = blocks
    for j in range(blocks - 1, -1, -1):
        if not inside[j]:
            break
        start = j
    burn = start * size
    return burn, start < blocks - blocks // 3


def _tau_int(draws: np.ndarray) -> float:
    """Integrated autocorrelation time (steps per effective sample), averaged over chains."""
    taus = [len(row) / max(diag.effective_sample_size(row), 1e-9) for row in draws
            if len(row) >= 8]
    return float(np.mean(taus)) if taus else 1.0


def _excess_stats(losses: np.ndarray, lo: int, hi: int, init_loss: float) -> tuple[float, float]:
    """Mean excess loss on steps [lo, hi) over chains, and its standard error."""
    part = losses[:, lo:hi]
    means = part.mean(axis=1) - init_loss
    mean = float(means.mean())
    within = [row.var(ddof=1) / max(diag.effective_sample_size(row), 1.0) for row in part
              if len(row) > 2]
    se_w = math.sqrt(float(np.sum(within))) / part.shape[0] if within else 0.0
    se_b = float(means.std(ddof=1)) / math.sqrt(len(means)) if len(means) > 1 else 0.0
    return mean, max(se_w, se_b)


# --------------------------------------------------------------------------------------------
# curvature probe
# --------------------------------------------------------------------------------------------
def top_curvature(target: SamplingTarget, *, iters: int = 20, num_samples: int = 4096,
                  seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of ``∇²L_n(w*)`` (power iteration, finite-difference HVPs).

    Runs two power iterations at once from random starts and returns the larger Rayleigh
    quotient, on the first ``num_samples`` samples (the mask of a weight-refined target applies).
    """
    gen = torch.Generator().manual_seed(seed)
    dev = target.device
    rows = 2
    target.decide_mode(rows)
    batch = [t[:num_samples] for t in target.leaves]
    anchor = target.anchor
    mask = target.mask
    v = torch.randn(rows, target.dim, generator=gen).to(dev)
    if mask is not None:
        v = v * mask
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    scale = float(anchor.pow(2).mean().sqrt()) if target.dim else 1.0
    delta = 1e-3 * max(scale, 1e-2)
    rayleigh = torch.zeros(rows)
    for _ in range(iters):
        gp, _ = target.grad_and_loss(anchor + delta * v, batch, True)
        gp = gp.clone()  # the loop mode returns a view of a reused buffer
        gm, _ = target.grad_and_loss(anchor - delta * v, batch, True)
        hv = (gp - gm) / (2 * delta)
        if mask is not None:
            hv = hv * mask
        rayleigh = (hv * v).sum(dim=1).cpu()
        norm = hv.norm(dim=1, keepdim=True)
        if not bool(torch.isfinite(norm).all()) or float(norm.max()) == 0.0:
            break
        v = hv / norm.clamp_min(1e-30)
    # power iteration finds the eigenvalue of largest magnitude; away from a minimum (e.g. an
    # untrained network) it can be negative, and its magnitude still sets the step-size scale
    value = float(rayleigh.abs().max())
    return value if math.isfinite(value) and value > 0 else 0.0


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------
def _pilot(target: SamplingTarget, *, step_size: float, localization: float, nbeta: float,
           num_chains: int, num_steps: int, sampler: str, seed: int,
           sampler_kwargs: Mapping[str, Any] | None, compile: bool | str = "auto",
           expected_calls: int = 1,
           on_progress: Any = None) -> tuple[PilotRow, np.ndarray | None]:
    every = max(1, num_steps // 40)
    checks = range(num_steps // 4, num_steps, every) if sampler != "sgnht" else ()
    traces = sample_chains(target, num_chains=num_chains, num_steps=num_steps,
                           step_size=step_size, localization=localization, nbeta=nbeta,
                           sampler=sampler, seed=seed, sampler_kwargs=sampler_kwargs,
                           acceptance_steps=checks, check_every=max(25, num_steps // 8),
                           on_divergence="stop", compile=compile,
                           expected_calls=expected_calls, on_progress=on_progress)
    nan = float("nan")
    if traces.diverged:
        row = PilotRow(step_size=float(step_size), localization=float(localization), llc=nan,
                       stderr=nan, burnin=0, plateau=False, acceptance=nan, frac_below=nan,
                       drift=nan, drift_stderr=nan, tau_int=nan, diverged=True,
                       diverged_step=int(traces.diverged_step), seconds=traces.seconds)
        return row, None
    losses = np.asarray(traces.losses, dtype=np.float64)
    burn, plateau = burnin_length(losses)
    start = burn if plateau else num_steps // 2
    draws = losses[:, start:]
    excess, se = _excess_stats(losses, start, num_steps, target.init_loss)
    acc, acc_se = _stationary_acceptance(traces.acceptance, traces.acceptance_steps, start)
    row = PilotRow(step_size=float(step_size), localization=float(localization),
                   llc=nbeta * excess, stderr=nbeta * se, burnin=int(burn), plateau=bool(plateau),
                   acceptance=acc, frac_below=float((draws < target.init_loss).mean()),
                   drift=nan, drift_stderr=nan, tau_int=_tau_int(draws), diverged=False,
                   diverged_step=-1, seconds=traces.seconds, acceptance_stderr=acc_se)
    return row, losses


def _stationary_acceptance(acceptance: np.ndarray, steps: tuple[int, ...], start: int,
                           min_checks: int = 4) -> tuple[float, float]:
    """Mean MALA acceptance of the checks at steps ``>= start`` (at least the last
    ``min_checks``) and its standard error.

    The acceptance depends on where the chain is: started at a sharp minimum it is far lower than
    in the posterior's bulk (trained demo transformer, ε = 2.6e-4: 0.35 over the first 100
    steps, 0.90-0.95 per 100-step window after), so only the stationary stretch judges the step
    size. The standard error treats the per-check means over the chains as independent.
    """
    if not len(acceptance):
        return float("nan"), float("nan")
    at = np.asarray(steps)
    keep = at >= start
    if int(keep.sum()) < min_checks:
        keep = np.zeros(len(at), dtype=bool)
        keep[-min_checks:] = True
    per_check = np.asarray(acceptance, dtype=np.float64)[keep].mean(axis=1)
    se = (float(per_check.std(ddof=1) / math.sqrt(len(per_check))) if len(per_check) > 1
          else float("nan"))
    return float(per_check.mean()), se


def _with_drift(row: PilotRow, losses: np.ndarray | None, smaller: PilotRow,
                smaller_losses: np.ndarray | None, init_loss: float) -> PilotRow:
    """Compare the excess loss of ε and ε/2 over the same Langevin time (second half of ε/2's)."""
    if losses is None or smaller_losses is None:
        return row
    ratio = smaller.step_size / row.step_size  # ≈ 1/2
    t_small = smaller_losses.shape[1]
    lo_s, hi_s = t_small // 2, t_small
    lo, hi = int(round(lo_s * ratio)), int(round(hi_s * ratio))
    if hi - lo < 8:
        return row
    big, se_big = _excess_stats(losses, lo, hi, init_loss)
    small, se_small = _excess_stats(smaller_losses, lo_s, hi_s, init_loss)
    if small <= 0:
        return row
    drift = big / small - 1
    se = math.hypot(se_big / small, big * se_small / small**2)
    return PilotRow(**{**asdict(row), "drift": float(drift), "drift_stderr": float(se)})


#: Share of the budget the calibration (curvature probe and pilots) may spend; the estimate it
#: configures gets the rest.
CALIBRATION_SHARE = 0.4
#: Pilots the pilot length is planned for (the grid stops at the first step size that passes).
PLANNED_PILOTS = 4
#: Fewest effective samples (all chains) the draws aim for, whatever the stderr target.
MIN_ESS = 100.0
#: Power iterations of the curvature probe.
CURVATURE_ITERS = 20


def calibrate(model: nn.Module | SamplingTarget, data: Any = None, loss_fn: LossFn | None = None,
              *, num_steps: int | None = None, num_pilot_chains: int = 2, grid_size: int = 6,
              grid_top: float = 0.5, step_sizes: list[float] | None = None,
              localization: float = 1.0, nbeta: float | None = None,
              batch_size: int | None = None, sampler: str = "sgld",
              sampler_kwargs: Mapping[str, Any] | None = None, params: ParamSelection = None,
              min_acceptance: float = 0.8, max_below: float = 0.3, drift_tol: float = 0.15,
              num_chains: int | None = None, target_ess: float = 400.0,
              target_rel_stderr: float = 0.02,
              min_draws: int = 200, max_draws: int = 20000, min_burnin: int = 200,
              max_burnin: int = 20000, max_localization_rounds: int = 2,
              max_extra_levels: int = 12, seed: int = 0,
              device: str | torch.device | None = None,
              vectorize: bool | str = "auto", compile: bool | str = "auto",
              expected_calls: int = 1, budget: int | None = DEFAULT_BUDGET,
              progress: bool | None = None, _meter: Meter | None = None,
              _reserve: int = 0) -> Calibration:
    """Choose step size, localization, burn-in and draws for ``estimate_llc`` from pilot chains.

    See the module docstring and ``docs/calibration.md`` for the criteria.

    Args:
        model: the network at w*, or a :class:`SamplingTarget` (then ``data``, ``loss_fn``,
            ``params``, ``batch_size``, ``device``, ``vectorize`` are ignored).
        data: as for ``estimate_llc``.
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss``; None:
            :func:`~devinterp.analyses.lm_loss` (next-token cross-entropy).
        num_steps: steps of each pilot chain; None: planned from the budget (the pilot share
            over ``PLANNED_PILOTS`` pilots, between 60 and 400), 400 without one.
        num_pilot_chains: chains per pilot.
        grid_size: number of step sizes (factors of 2 apart, from ``grid_top / h`` down); the
            pilots stop at the first (largest) step size that passes.
        grid_top: ε·h at the top of the grid (h: the largest curvature of the potential at w*).
        step_sizes: an explicit grid instead (any order).
        localization: γ to start with (raised tenfold when w* is not a minimum).
        nbeta: nβ; None: ``n / log n``.
        batch_size: minibatch size; None: the DataLoader's, else ``min(n, 512)``.
        sampler: ``"sgld"`` or ``"rmsprop_sgld"`` (``"sgnht"`` has no acceptance check).
        sampler_kwargs: extra sampler options.
        params: the weight-refined selection, as for ``estimate_llc``.
        min_acceptance: lowest acceptable mean MALA acceptance of the pilot moves.
        max_below: largest acceptable fraction of draws below ``L_n(w*)``.
        drift_tol: largest acceptable relative excess-loss difference against ε/2 (beyond
            2 standard errors).
        num_chains: chains of the estimate this calibration configures; None: 2 under a
            budget (λ̂ depends on the Langevin time of each chain, so fewer, longer chains
            measure better for the same model evaluations; see ``docs/calibration.md``), 4
            without one.
        target_ess: the most effective samples (all chains) the chosen ``num_draws`` aims for.
        target_rel_stderr: ... fewer when the pilot shows that fewer give a stderr of this
            fraction of λ̂ (a large λ̂ needs few samples), but at least ``MIN_ESS``.
        min_draws, max_draws, min_burnin, max_burnin: bounds of the chosen lengths.
        max_localization_rounds: how many times γ may be raised tenfold.
        max_extra_levels: how many halvings may extend the grid down when every step size is
            too large (diverges or has a low acceptance).
        seed: seed of the pilots (same seed, same calibration).
        device: where to sample.
        vectorize: as for ``estimate_llc``.
        compile, expected_calls: as for ``estimate_llc``; the pilots weigh
            ``expected_calls × grid_size`` runs against the compile cost.
        budget: model evaluations of the whole estimate this calibration configures (as for
            ``estimate_llc``; None: no limit). The calibration spends at most
            ``CALIBRATION_SHARE`` of it (curvature probe and pilots); when that runs out the
            choice is made among the step sizes tried (with a warning if none passed).
        progress: a progress bar and the plan on stderr; None: when stderr is a terminal.

    Returns:
        A :class:`Calibration`; ``ok`` is False (with warnings) when no step size met every
        criterion, in which case the most conservative non-diverged one is chosen.

    Raises:
        InvalidInputError: bad inputs or options.
        ChainDivergedError: never (diverged pilots are table rows); but if every step size of the
            grid diverges, an :class:`InvalidInputError` says so.
    """
    t_start = time.perf_counter()
    budget = check_budget(budget)
    if num_chains is None:
        num_chains = 2 if budget is not None else 4
    if num_steps is None:
        auto_steps = True
        num_steps = 400
    else:
        auto_steps = False
    _validate(num_steps=num_steps, num_pilot_chains=num_pilot_chains, grid_size=grid_size,
              grid_top=grid_top, min_acceptance=min_acceptance, max_below=max_below,
              drift_tol=drift_tol, num_chains=num_chains, target_ess=target_ess,
              min_draws=min_draws, max_draws=max_draws, min_burnin=min_burnin,
              max_burnin=max_burnin, localization=localization, step_sizes=step_sizes)
    if not (isinstance(target_rel_stderr, (int, float)) and not isinstance(target_rel_stderr, bool)
            and target_rel_stderr > 0):
        raise InvalidInputError(f"target_rel_stderr must be a positive number, got "
                                f"{target_rel_stderr!r}")
    if sampler == "sgnht":
        raise InvalidInputError("calibrate supports 'sgld' and 'rmsprop_sgld' (it needs the MALA "
                                "acceptance check, which SGNHT lacks); calibrate with 'sgld'")
    prepared = isinstance(model, SamplingTarget)
    target = as_target(model, data, loss_fn, caller="calibrate", params=params, batch_size=batch_size,
                       device=device, vectorize=vectorize, compile=compile,
                       expected_calls=expected_calls)
    own_meter = _meter is None
    meter = _meter if _meter is not None else Meter(budget, progress=progress, desc="calibrate")
    if own_meter and not prepared:
        meter.add(math.ceil(target.n / max(min(target.batch_size, target.eval_batch_size), 1)))
    start_used = meter.used
    nbeta = default_nbeta(target.n) if nbeta is None else float(nbeta)
    probe_cost = CURVATURE_ITERS * 2 * 2
    limit = math.inf if budget is None else CALIBRATION_SHARE * budget  # on meter.used
    if auto_steps and budget is not None:
        per_pilot = (limit - meter.used - probe_cost) / (num_pilot_chains * PLANNED_PILOTS)
        num_steps = int(min(400, max(60, per_pilot - 30)))  # ~30 acceptance checks each
    pilot_cost = num_pilot_chains * (num_steps + len(range(num_steps // 4, num_steps,
                                                           max(1, num_steps // 40))))
    if own_meter:
        meter.plan(int(min(limit, meter.used + probe_cost + PLANNED_PILOTS * pilot_cost)))
    else:
        meter.plan(meter.used + probe_cost + PLANNED_PILOTS * pilot_cost
                   + (0 if budget is None else max(int(budget - limit), 0)))
    meter.say(f"calibrate: curvature probe, then pilots of {num_pilot_chains} chains × "
              f"{num_steps} steps from the largest step size down (ε·h = {grid_top:g}, /2 each) "
              "until one passes the acceptance, plateau and drift criteria"
              + ("" if budget is None else
                 f"; at most {int(limit - meter.used):,} of the {budget:,} model evaluations"))
    with meter if own_meter else contextlib.nullcontext():
        mu = top_curvature(target, seed=seed, iters=CURVATURE_ITERS)
        meter.add(probe_cost)
        table: list[PilotRow] = []
        traces: dict[tuple[float, float], np.ndarray | None] = {}
        gamma = float(localization)
        warnings: list[str] = []
        chosen: PilotRow | None = None
        reason = ""
        exhausted = False
        for round_ in range(max_localization_rounds + 1):
            h = nbeta * mu + gamma
            if step_sizes is not None:
                grid = sorted((float(e) for e in step_sizes), reverse=True)
            else:
                grid = [grid_top / h / 2**k for k in range(grid_size)]
            rows: list[PilotRow] = []
            extra_levels = 0
            while True:
                for eps in grid:
                    if meter.used + pilot_cost > limit:
                        exhausted = True
                        break
                    row, losses = _pilot(target, step_size=eps, localization=gamma, nbeta=nbeta,
                                         num_chains=num_pilot_chains, num_steps=num_steps,
                                         sampler=sampler, seed=seed,
                                         sampler_kwargs=sampler_kwargs, compile=compile,
                                         expected_calls=expected_calls * max(grid_size, 1),
                                         on_progress=meter.add)
                    if rows:
                        prev = rows[-1]
                        rows[-1] = _with_drift(prev, traces[(prev.step_size, gamma)], row,
                                               losses, target.init_loss)
                    rows.append(row)
                    traces[(eps, gamma)] = losses
                    # the largest step size whose drift against ε/2 is known passes: stop here
                    if len(rows) > 1 and _choose(rows[:-1], min_acceptance=min_acceptance,
                                                 max_below=max_below,
                                                 drift_tol=drift_tol)[0] is not None:
                        break
                if not rows:
                    break
                done = _choose(rows[:-1], min_acceptance=min_acceptance, max_below=max_below,
                               drift_tol=drift_tol)
                chosen, reason = done if done[0] is not None else _choose(
                    rows, min_acceptance=min_acceptance, max_below=max_below,
                    drift_tol=drift_tol)
                last = rows[-1]
                # every step size too large (divergence or low acceptance): extend the grid down
                too_large = last.diverged or not (last.acceptance >= min_acceptance)
                if (chosen is not None or not too_large or extra_levels >= max_extra_levels
                        or exhausted):
                    break
                grid = [last.step_size / 2]
                extra_levels += 1
            table.extend(rows)
            if chosen is not None or exhausted:
                break
            live = [r for r in rows if not r.diverged]
            below = bool(live) and min(r.frac_below for r in live) > max_below
            negative = bool(live) and all(r.llc <= 0 for r in live)
            if (below or negative) and round_ < max_localization_rounds:
                gamma *= 10
                continue
            break
    ok = chosen is not None
    if chosen is None:
        live = [r for r in table if not r.diverged]
        if not table:
            raise InvalidInputError(
                f"the budget ({budget} model evaluations) does not cover a single pilot of "
                f"{num_pilot_chains} chains × {num_steps} steps: raise budget= or lower "
                "num_steps")
        if not live and not exhausted:
            raise InvalidInputError(
                "every pilot step size diverged (largest curvature estimate "
                f"{mu:.3g}); pass smaller step_sizes=[...] to calibrate, or check the loss")
        spent = (f"the calibration's share of the budget ({int(limit):,} model evaluations) "
                 "ran out; " if exhausted else "")
        chosen, how = _fallback(table, min_acceptance=min_acceptance, max_below=max_below,
                                drift_tol=drift_tol)
        if chosen is None:  # every pilot failed badly: below the grid, never one of them
            eps, why = _below_grid(table, min_acceptance=min_acceptance)
            g = min(table, key=lambda r: r.step_size).localization
            rescue_limit = math.inf if budget is None else RESCUE_SHARE * budget
            how = f"every pilot failed badly ({why}): "
            if meter.used + pilot_cost <= rescue_limit:  # one pilot there, from the estimate's share
                row, losses = _pilot(target, step_size=eps, localization=g, nbeta=nbeta,
                                     num_chains=num_pilot_chains, num_steps=num_steps,
                                     sampler=sampler, seed=seed, sampler_kwargs=sampler_kwargs,
                                     compile=compile, expected_calls=expected_calls,
                                     on_progress=meter.add)
                table.append(row)
                traces[(eps, g)] = losses
                bad = _badly_failed(row, min_acceptance=min_acceptance)
                if bad is None:
                    chosen = row
                    how += (f"a pilot below the grid at ε={eps:.3g} (acceptance "
                            f"{row.acceptance:.3f}) is the step size used")
                else:
                    eps2, why2 = _below_grid([row], min_acceptance=min_acceptance)
                    chosen = _untested_row(eps2, g)
                    how += (f"a pilot below the grid at ε={eps:.3g} failed too ({bad}); "
                            f"chose ε={eps2:.3g} ({why2}), untested by a pilot")
            else:
                chosen = _untested_row(eps, g)
                how += f"chose ε={eps:.3g} below the grid, untested by a pilot (no budget left for one)"
        warnings.append(
            f"no step size met every criterion ({spent}{reason}); {how}; using "
            f"step_size={chosen.step_size:.3g}, localization={chosen.localization:g}. The estimate "
            "may be unreliable: check that w* is a trained minimum, or pass step_sizes=[...] with "
            "smaller values and a larger num_steps" + (", or a larger budget=" if exhausted else ""))
        reason = (f"fallback: no step size met every criterion ({spent}{reason}); chose ε="
                  f"{chosen.step_size:.3g}: {how}")
    gamma = chosen.localization
    num_burnin, num_draws, ess_aim, extra = _lengths(
        chosen, [r for r in table if r.localization == gamma], traces, num_steps=num_steps,
        num_pilot_chains=num_pilot_chains, num_chains=num_chains, target_ess=target_ess,
        target_rel_stderr=target_rel_stderr, min_draws=min_draws, max_draws=max_draws,
        min_burnin=min_burnin, max_burnin=max_burnin)
    if budget is not None:
        # fill the budget: the calibrated estimate is corrected for the step size
        # (estimate_llc(correction="auto")), so longer chains no longer drift high on the larger
        # networks (docs/calibration.md). Inside estimate_llc the estimate spends the same
        # budget; a standalone calibration is reused by estimates at their own budget (the
        # default unless told), so its lengths fill at most the default one
        fill_to = budget if not own_meter else min(budget, DEFAULT_BUDGET)
        num_chains_est, num_burnin, num_draws, fill = _fill_budget(
            num_chains, num_burnin, num_draws, fill_to - meter.used - _reserve,
            max_burnin=max_burnin, max_draws=max_draws)
        if fill:
            extra += "; " + fill
    else:
        num_chains_est = num_chains
    reason = f"{reason}; {extra}"
    if gamma != localization:
        reason += (f"; localization raised from {localization:g} to {gamma:g} because draws fell "
                   "below L(w*) (w* is not a minimum)")
        warnings.append(
            f"draws fell below L(w*) at localization={localization:g}: w* does not look like a "
            f"local minimum; calibrated with localization={gamma:g}. Train longer, or read the "
            "estimate as the LLC of the γ-localized posterior")
    cal = Calibration(
        step_size=chosen.step_size, localization=gamma, nbeta=nbeta, num_burnin=num_burnin,
        num_draws=num_draws, num_chains=num_chains_est, batch_size=target.batch_size,
        sampler=sampler, n=target.n, init_loss=float(target.init_loss),
        curvature=nbeta * mu + gamma, ok=ok, reason=reason, table=tuple(table), seed=seed,
        seconds=time.perf_counter() - t_start, warnings=tuple(warnings), target_ess=ess_aim,
        cost=int(meter.used - start_used), budget=budget)
    meter.say(f"calibrate: step_size={cal.step_size:.3g} (ε·h = {cal.step_size * cal.curvature:.2g}"
              f"), {'ok' if ok else 'FALLBACK (ok: false)'}: " + reason.split(";")[0]
              + f"; {cal.cost:,} model evaluations")
    return cal


#: A fallback never uses a step size whose pilot's acceptance was below this share of
#: ``min_acceptance`` (nor one that diverged or gave λ̂ ≤ 0): those fail badly.
FALLBACK_ACCEPTANCE_SHARE = 0.5
#: The share of the whole budget that the calibration may reach with one pilot below the grid
#: when every pilot failed badly (it comes out of the estimate's share).
RESCUE_SHARE = 0.6


def _badly_failed(row: PilotRow, *, min_acceptance: float) -> str | None:
    """Why a pilot's step size must never be used, even by a fallback (None: it may be)."""
    if row.diverged:
        return f"ε={row.step_size:.3g} diverged at step {row.diverged_step}"
    if not (row.acceptance >= FALLBACK_ACCEPTANCE_SHARE * min_acceptance):
        return (f"ε={row.step_size:.3g} acceptance {row.acceptance:.3f} < "
                f"{FALLBACK_ACCEPTANCE_SHARE * min_acceptance:.3g}")
    if not (math.isfinite(row.llc) and row.llc > 0):
        return f"ε={row.step_size:.3g} λ̂ = {row.llc:.3g}"
    return None


def _fallback(table: list[PilotRow], *, min_acceptance: float, max_below: float,
              drift_tol: float) -> tuple[PilotRow | None, str]:
    """The step size to use when no pilot met every criterion, and why (None: every pilot failed badly).

    Only pilots that did not fail badly (:func:`_badly_failed`) are candidates, among the largest
    γ tried: the largest ε that met every criterion but the plateau (pilots too short to see one),
    else the highest acceptance (those that reached a plateau first), then the smaller ε.
    """
    sound = [r for r in table if _badly_failed(r, min_acceptance=min_acceptance) is None]
    if not sound:
        return None, "every pilot failed badly"
    g_max = max(r.localization for r in sound)
    cands = [r for r in sound if r.localization == g_max]
    unsettled = [r for r in cands if _only_plateau_failed(
        r, min_acceptance=min_acceptance, max_below=max_below, drift_tol=drift_tol)]
    if unsettled:
        return (max(unsettled, key=lambda r: r.step_size),
                "the largest that met every criterion but the plateau (the pilots were too short "
                "to see one)")
    chosen = max(cands, key=lambda r: (r.plateau, r.acceptance, -r.step_size))
    return chosen, ("the highest acceptance" + (" among those that reached a plateau" if chosen.plateau
                                                else "") + " among the pilots that did not fail badly")


def _below_grid(table: list[PilotRow], *, min_acceptance: float) -> tuple[float, str]:
    """A step size below every pilot's, when all failed badly, and how it was found.

    MALA's log-acceptance of a smooth target falls like ε³, so from the smallest pilot's
    acceptance ``a`` the step size scales by ``(log min_acceptance / log a)^(1/3)``, between 1/16
    and 1/2 (1/4 after a divergence, 1/16 when nothing was accepted).
    """
    smallest = min(table, key=lambda r: r.step_size)
    a = smallest.acceptance
    if smallest.diverged:
        factor, how = 0.25, f"ε={smallest.step_size:.3g} diverged: /4"
    elif math.isfinite(a) and 0 < a < min_acceptance:
        factor = (math.log(min_acceptance) / math.log(a)) ** (1 / 3)
        how = (f"acceptance {a:.3g} at ε={smallest.step_size:.3g}, log-acceptance ∝ ε³ "
               f"for {min_acceptance}")
    else:
        factor, how = 1 / 16, f"ε={smallest.step_size:.3g} accepted nothing: /16"
    factor = min(max(factor, 1 / 16), 0.5)
    return smallest.step_size * factor, how


def _untested_row(step_size: float, localization: float) -> PilotRow:
    """The stand-in row of a step size below the grid that no pilot tried (all statistics NaN)."""
    nan = float("nan")
    return PilotRow(step_size=float(step_size), localization=float(localization), llc=nan,
                    stderr=nan, burnin=0, plateau=False, acceptance=nan, frac_below=nan,
                    drift=nan, drift_stderr=nan, tau_int=nan, diverged=False, diverged_step=-1,
                    seconds=0.0)


def _choose(rows: list[PilotRow], *, min_acceptance: float, max_below: float,
            drift_tol: float) -> tuple[PilotRow | None, str]:
    """The largest step size meeting every criterion (rows sorted by ε descending)."""
    fails: list[str] = []
    for row in rows:
        why = _failures(row, min_acceptance=min_acceptance, max_below=max_below,
                        drift_tol=drift_tol)
        if not why:
            larger = [f"{f}" for f in fails]
            text = (f"ε={row.step_size:.3g} is the largest step size with no divergence, "
                    f"acceptance {row.acceptance:.3f} (± {np.nan_to_num(row.acceptance_stderr):.3f}) "
                    f"≥ {min_acceptance}, "
                    f"{row.frac_below:.0%} of draws below L(w*) (≤ {max_below:.0%}), "
                    f"λ̂ = {row.llc:.4g} > 0")
            if math.isfinite(row.drift):
                text += (f", and drift against ε/2 {row.drift:+.1%} (± {row.drift_stderr:.1%}, "
                         f"tolerance {drift_tol:.0%})")
            if larger:
                text += "; larger step sizes failed: " + "; ".join(larger)
            return row, text
        fails.append(f"ε={row.step_size:.3g}: " + ", ".join(why))
    return None, "; ".join(fails[-3:]) if fails else "empty grid"


def only_plateau_missing(calibration: Calibration, *, min_acceptance: float = 0.8,
                         max_below: float = 0.3, drift_tol: float = 0.15) -> bool:
    """Whether a fallback calibration's step size met every criterion but the plateau.

    That is the signature of slow directions: the pilots' λ̂ still rises when they end (it
    grows with the Langevin time ε·steps they cover), so none sees a plateau, while the step
    size itself is sound. ``estimate_llc`` lets the slow-direction check re-plan such a
    calibration like a successful one (docs/calibration.md, "Slow directions").
    """
    if calibration.ok:
        return False
    rows = [r for r in calibration.table if r.step_size == calibration.step_size
            and r.localization == calibration.localization]
    return bool(rows) and _only_plateau_failed(rows[0], min_acceptance=min_acceptance,
                                               max_below=max_below, drift_tol=drift_tol)


def _only_plateau_failed(row: PilotRow, *, min_acceptance: float, max_below: float,
                         drift_tol: float) -> bool:
    """The pilot met every criterion but the plateau (too short to see one)."""
    return not row.plateau and _failures(
        replace(row, plateau=True), min_acceptance=min_acceptance, max_below=max_below,
        drift_tol=drift_tol) == []


def _failures(row: PilotRow, *, min_acceptance: float, max_below: float,
              drift_tol: float) -> list[str]:
    if row.diverged:
        return [f"diverged at step {row.diverged_step}"]
    why = []
    if not (row.acceptance >= min_acceptance):
        why.append(f"acceptance {row.acceptance:.3f} (± {np.nan_to_num(row.acceptance_stderr):.3f})"
                   f" < {min_acceptance}")
    if not row.plateau:  # its λ̂ and acceptance come from a trace still moving away from w*
        why.append("no plateau within the pilot")
    if row.frac_below > max_below:
        why.append(f"{row.frac_below:.0%} of draws below L(w*)")
    if not row.llc > 0:
        why.append(f"λ̂ = {row.llc:.3g} ≤ 0")
    if math.isfinite(row.drift) and row.drift - 2 * row.drift_stderr > drift_tol:
        why.append(f"drift against ε/2 {row.drift:+.1%} > {drift_tol:.0%}")
    return why


def _lengths(chosen: PilotRow, rows: list[PilotRow],
             traces: Mapping[tuple[float, float], np.ndarray | None], *, num_steps: int,
             num_pilot_chains: int, num_chains: int, target_ess: float,
             target_rel_stderr: float, min_draws: int, max_draws: int, min_burnin: int,
             max_burnin: int) -> tuple[int, int, float, str]:
    """Burn-in (Langevin time of the plateau, converted to steps at ε) and draws (ESS).

    Returns ``(num_burnin, num_draws, effective samples aimed for, the reason in words)``.
    """
    eps = chosen.step_size
    # the burn-in relaxes in Langevin time τ = ε·t: read it on the largest step no larger than 4ε
    # that did not diverge and reached its plateau (more τ in the same number of steps)
    refs = [r for r in rows if not r.diverged and r.plateau and eps <= r.step_size <= 4 * eps
            and r.acceptance >= 0.5]
    if refs:
        ref = max(refs, key=lambda r: r.step_size)
        tau_burn = ref.burnin * ref.step_size
        burn_src = f"plateau after {ref.burnin} steps at ε={ref.step_size:.3g}"
    else:
        ref = chosen
        tau_burn = num_steps * eps
        burn_src = "no plateau seen in the pilots: burn-in = the whole pilot length in Langevin time"
    # factor 2: the plateau is judged on a short pilot; burn-in is cheap insurance against a slow rise
    burn = int(math.ceil(2 * tau_burn / eps))
    num_burnin = int(min(max(burn, min_burnin), max_burnin))
    tau = chosen.tau_int if math.isfinite(chosen.tau_int) else 1.0
    tau = max(tau, 1.0)
    # effective samples for a stderr of target_rel_stderr·λ̂, read from the pilot's own stderr
    aim = float(target_ess)
    start = chosen.burnin if chosen.plateau else num_steps // 2
    ess_pilot = num_pilot_chains * max(num_steps - start, 1) / tau
    if chosen.llc > 0 and math.isfinite(chosen.stderr) and chosen.stderr > 0:
        for_rel = ess_pilot * (chosen.stderr / (target_rel_stderr * chosen.llc)) ** 2
        aim = float(min(target_ess, max(MIN_ESS, for_rel)))
    draws = int(math.ceil(aim * tau / num_chains))
    num_draws = int(min(max(draws, min_draws, num_burnin // 2), max_draws))
    text = (f"num_burnin={num_burnin} from the {burn_src} (2× that Langevin time); "
            f"num_draws={num_draws} for ~{aim:.0f} effective draws over {num_chains} "
            f"chains (autocorrelation time {tau:.1f} steps; a stderr of "
            f"{target_rel_stderr:.0%} of λ̂ needs ~{aim:.0f}, at most {target_ess:.0f})")
    return num_burnin, num_draws, aim, text


#: At most this factor longer than the calibrated lengths when filling the budget.
MAX_STRETCH = 8.0
#: Least share of each chain spent as burn-in when the lengths fill the budget (the draws are
#: the second half: λ̂ of a chain from w* still rises after the pilots' plateau; docs/calibration.md).
BURNIN_FRACTION = 0.5


def _fill_budget(num_chains: int, num_burnin: int, num_draws: int, available: float, *,
                 max_burnin: int, max_draws: int) -> tuple[int, int, int, str]:
    """Chains and lengths that use the estimate's share of the budget.

    On these networks λ̂ keeps changing with the Langevin time ε·t long after the loss trace
    looks flat (``docs/calibration.md``, "Lengths under a budget"), and the per-chain
    estimate is unbiased only when the chain is long: so the budget left after the calibration
    goes into longer chains rather than being left unused. With a burn-in longer than a third
    of a chain, two chains instead of more (each chain pays the burn-in again). Burn-in and
    draws grow in proportion, at most ``MAX_STRETCH`` times and up to ``max_burnin`` /
    ``max_draws``. At least ``BURNIN_FRACTION`` of each chain is burn-in, also when the
    draws do not fit and are cut later (``budget.fit_lengths``): the pilots see only the fast
    part of the relaxation, and λ̂ of a chain from w* keeps rising for 1,000-2,000 steps even on
    small deep linear networks, so the draws come from the second half of each chain.
    """
    per_check = 1 + 1 / 30
    chains = num_chains
    per = available / chains / per_check
    if chains > 2 and num_burnin > per / 3:
        chains = 2
        per = available / chains / per_check
    total = num_burnin + num_draws
    if per <= total:
        # the draws will be cut to fit (estimate_llc warns with the ESS reached): the burn-in
        # still takes its share of what each chain can afford
        burn = min(max(num_burnin, int(math.ceil(BURNIN_FRACTION * per))), max_burnin)
        text = (f"{chains} chains (the budget cannot fit {num_chains} with this burn-in)"
                if chains != num_chains else "")
        if burn != num_burnin:
            text += ("; " if text else "") + (
                f"num_burnin raised to {burn} ({BURNIN_FRACTION:.0%} of the {int(per)} steps "
                "per chain the budget allows)")
        return chains, burn, num_draws, text
    scale = min(per / total, MAX_STRETCH)
    burn = int(min(num_burnin * scale, max_burnin))
    draws = int(min(num_draws * scale, max_draws, per - burn))
    draws = max(draws, num_draws)
    length = burn + draws
    if burn < BURNIN_FRACTION * length:
        burn = min(int(math.ceil(BURNIN_FRACTION * length)), max_burnin)
        draws = length - burn
    text = (f"stretched to {chains} chains × ({burn} + {draws}) steps to use the budget "
            f"({int(available):,} model evaluations left after the calibration)")
    return chains, burn, draws, text


def _validate(**kw: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name in ("num_steps", "num_pilot_chains", "grid_size", "num_chains", "min_draws",
                 "max_draws", "min_burnin", "max_burnin"):
        v = kw[name]
        if not is_int(v) or v < (0 if name == "min_burnin" else 1):
            raise InvalidInputError(f"{name} must be a positive int, got {v!r}")
    if kw["num_steps"] < 40:
        raise InvalidInputError(f"num_steps must be >= 40 for the pilot traces to be read, "
                                f"got {kw['num_steps']}")
    if kw["min_draws"] > kw["max_draws"] or kw["min_burnin"] > kw["max_burnin"]:
        raise InvalidInputError("min_draws/min_burnin must not exceed max_draws/max_burnin")
    for name in ("grid_top", "target_ess", "localization"):
        v = kw[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise InvalidInputError(f"{name} must be a positive finite number, got {v!r}")
    for name in ("min_acceptance", "max_below"):
        v = kw[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise InvalidInputError(f"{name} must be in [0, 1], got {v!r}")
    if not kw["drift_tol"] >= 0:
        raise InvalidInputError(f"drift_tol must be >= 0, got {kw['drift_tol']!r}")
    s = kw["step_sizes"]
    if s is not None:
        if not len(s) or any(isinstance(e, bool) or not isinstance(e, (int, float))
                             or not (e > 0 and math.isfinite(e)) for e in s):
            raise InvalidInputError(f"step_sizes must be a non-empty list of positive numbers, "
                                    f"got {s!r}")


# --------------------------------------------------------------------------------------------
# warnings used by estimate_llc
# --------------------------------------------------------------------------------------------
#: A reused calibration is suspect when the estimate's MALA acceptance leaves this band.
REUSE_ACCEPTANCE_BAND = (0.6, 0.995)
#: ... or when more than this fraction of draws lies below L(w*).
REUSE_MAX_BELOW = 0.3
#: w* is flagged as not a minimum when more than this fraction of draws lies below L(w*).
NOT_MINIMUM_BELOW = 0.5
#: ... or when the loss falls during the draws by this many standard errors and this fraction of
#: the excess loss.
NOT_MINIMUM_TREND_Z = -4.0
NOT_MINIMUM_TREND_REL = 0.05


def minimum_warning(result: Any) -> str | None:
    """A message when an ``LLCResult`` shows that w* is not near a local minimum, else None.

    Signs: λ̂ < 0; more than ``NOT_MINIMUM_BELOW`` of the draws below ``L_n(w*)``; or the
    loss falling during the draws (trend z < ``NOT_MINIMUM_TREND_Z`` and by more than
    ``NOT_MINIMUM_TREND_REL`` of the excess loss).
    """
    d = result.diagnostics
    draws = np.asarray(result.loss_trace, dtype=np.float64)
    signs = []
    if result.mean < 0:
        signs.append(f"λ̂ = {result.mean:.4g} is negative")
    if d.frac_below_init > NOT_MINIMUM_BELOW:
        signs.append(f"{d.frac_below_init:.0%} of the draws lie below L(w*)")
    half = draws.shape[1] // 2
    if half >= 4:
        drop = float(draws[:, :half].mean() - draws[:, -half:].mean())
        excess = abs(float(draws.mean()) - result.init_loss)
        scale = max(excess, 1e-12)
        if d.trend_z < NOT_MINIMUM_TREND_Z and drop / scale > NOT_MINIMUM_TREND_REL:
            signs.append(f"the loss falls during sampling (trend z = {d.trend_z:.1f})")
    if not signs:
        return None
    gamma = result.config.localization
    return ("w* does not look like a local minimum: " + "; ".join(signs) + ". SGLD keeps "
            "finding lower loss, so λ̂ measures the descent, not the local geometry. What to do: "
            "train longer (until the loss plateaus); or raise the localization (e.g. "
            f"localization={gamma * 10:g}) to keep the chains near w*; or use a smaller "
            "step_size; or estimate the data-refined LLC on data where w* is trained")


def reuse_signs(result: Any, calibration: Calibration) -> list[str]:
    """The signs that a reused calibration no longer fits ``result``'s model (empty: it fits).

    Signs: the MALA acceptance outside ``REUSE_ACCEPTANCE_BAND``; more than ``REUSE_MAX_BELOW``
    of the draws below ``L_n(w*)``; a different number of samples; or ``L_n(w*)`` more than 10×
    (or less than 1/10 of) the one calibrated at.
    """
    d = result.diagnostics
    signs = []
    lo, hi = REUSE_ACCEPTANCE_BAND
    if math.isfinite(d.acceptance) and not lo <= d.acceptance <= hi:
        signs.append(f"MALA acceptance {d.acceptance:.3f} outside [{lo}, {hi}]")
    if d.frac_below_init > REUSE_MAX_BELOW:
        signs.append(f"{d.frac_below_init:.0%} of draws below L(w*)")
    if result.config.n != calibration.n:
        signs.append(f"n = {result.config.n}, calibrated with n = {calibration.n}")
    a, b = abs(result.init_loss), abs(calibration.init_loss)
    if a > 0 and b > 0 and not 0.1 <= a / b <= 10:
        signs.append(f"L(w*) = {result.init_loss:.4g}, calibrated at {calibration.init_loss:.4g}")
    return signs


def reuse_warning(result: Any, calibration: Calibration) -> str | None:
    """A message when a reused calibration shows signs of no longer fitting, else None.

    The signs are :func:`reuse_signs`'.
    """
    signs = reuse_signs(result, calibration)
    if not signs:
        return None
    return ("the reused calibration (step_size=" f"{calibration.step_size:.3g}) may no longer fit "
            "this model: " + "; ".join(signs) + ". Calibrate again at this snapshot "
            "(estimate_llc(..., step_size='auto') or calibrate(...)) and reuse the new one")


#: Step sizes (halvings) a recalibration tries below a reused step size whose acceptance fell
#: below the band (the grid is extended further down while every one of them fails).
REFIT_LEVELS = 4


def refit_step_sizes(result: Any, calibration: Calibration,
                     step_sizes: Sequence[float] | None = None) -> list[float] | None:
    """The step sizes to calibrate again with, where a reused calibration's acceptance fell low.

    When ``result`` (an estimate made with ``calibration`` reused) has a MALA acceptance below
    ``REUSE_ACCEPTANCE_BAND``, the reused step size is too large for this snapshot, and so is
    every larger one: a recalibration with its usual grid (set by the curvature probe, judged by
    shorter pilots than the estimate) can pick the same step size again. The estimate's
    acceptance is the better evidence, so the new grid starts below it: the given
    ``step_sizes`` that are smaller (a calibration's explicit grid), else ``REFIT_LEVELS``
    halvings of it.

    Returns:
        The grid (largest first), or None when the acceptance is not below the band (calibrate
        with the usual grid).
    """
    acc = result.diagnostics.acceptance
    if not (math.isfinite(acc) and acc < REUSE_ACCEPTANCE_BAND[0]):
        return None
    eps = float(calibration.step_size)
    if step_sizes is not None:
        below = sorted((float(e) for e in step_sizes if float(e) < eps), reverse=True)
        if below:
            return below
    return [eps / 2**k for k in range(1, REFIT_LEVELS + 1)]
