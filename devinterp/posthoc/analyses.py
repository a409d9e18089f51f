"""Pluggable per-snapshot analyses for post-hoc runs.

An analysis is a small object with

- ``name``: a short identifier (``"llc"``, ``"circuits"``...), the first part of the results key;
- ``config() -> dict``: its JSON-able hyper-parameters; their hash is the third part of the key
  ``(analysis, step, config hash)``, so changing a hyper-parameter computes new results instead of
  reusing old ones;
- ``compute(model, snapshot, context) -> dict[str, float]``: the scalars of one snapshot, with the
  TensorBoard tags of the online callbacks (``llc/mean``, ``induction/L0H1``...);
- optionally ``needs_data`` (the LLC needs data and a loss) and ``prepare(model, context)``, run
  once on rank zero before the work is shared out (returns the analysis to use, e.g. with a
  calibrated step size); the returned object is sent to every rank, so it must pickle.

Analyses must be deterministic given ``context.seed`` / ``context.step_seed``: that is what makes
a 2-process run give the same numbers as a 1-process run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from devinterp.errors import InvalidInputError

__all__ = [
    "Analysis",
    "AnalysisContext",
    "LLCAnalysis",
    "CircuitAnalysis",
    "config_hash",
    "derive_seed",
]


@runtime_checkable
class Analysis(Protocol):
    """What the post-hoc runner needs from an analysis (see the module docstring)."""

    name: str

    def config(self) -> dict[str, Any]: ...

    def compute(self, model: nn.Module, snapshot: Any, context: AnalysisContext) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class AnalysisContext:
    """What an analysis gets besides the model.

    Attributes:
        step: Training step of the snapshot.
        seed: The run's base seed (same for every snapshot: e.g. the circuit scoring sequences).
        step_seed: A seed derived from ``(seed, step, analysis name)``: independent per snapshot,
            identical whatever the number of processes.
        device: Where to compute.
        data: LLC data (Dataset / DataLoader / tuple of tensors), or None when not needed.
        loss_fn: ``loss_fn(model, batch) -> scalar``, or None when not needed.
        hparams: The run's recorded hyper-parameters (``run.json``), possibly empty.
        workdir: The post-hoc output folder (for files an analysis keeps, e.g. a calibration).
        notes: Warnings an analysis wants kept: appended here, saved as ``notes`` in the record.
        progress: Progress bars of long one-time work (e.g. the LLC calibration) on stderr:
            None when stderr is a terminal, False never.
    """

    step: int
    seed: int
    step_seed: int
    device: torch.device
    data: Any = None
    loss_fn: Any = None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    workdir: str | None = None
    notes: list[str] = field(default_factory=list)
    progress: bool | None = False


def derive_seed(seed: int, step: int, name: str) -> int:
    """A 63-bit seed from ``(seed, step, name)`` (sha256), independent of scheduling and ranks."""
    digest = hashlib.sha256(f"{int(seed)}:{int(step)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def config_hash(name: str, config: Mapping[str, Any]) -> str:
    """12 hex digits identifying an analysis configuration (stable across runs and machines)."""
    text = json.dumps({"analysis": name, "config": config}, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _finite_scalars(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        v = float(v)
        out[str(k)] = v
    return out


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LLCAnalysis:
    """The local learning coefficient of each snapshot (:func:`devinterp.analyses.estimate_llc`).

    Arguments mirror ``estimate_llc``; ``None`` means "not given": with ``step_size="auto"`` the
    calibration decides, else ``estimate_llc``'s defaults apply. ``step_size="auto"`` calibrates
    once, in :meth:`prepare` (on rank zero, at the last selected snapshot), with
    :func:`devinterp.analyses.calibrate`, and reuses that calibration for every snapshot (explicit
    values still win over it); it is saved as ``calibration-<hash>.json`` in the output folder and
    reused by later runs with the same configuration. Each snapshot's chains are seeded with
    ``context.step_seed``. ``vectorize=False`` (per-chain model copies) by default, so no
    timing-based choice can change the numbers between processes.

    **The module's own settings.** When the rebuilt model defines ``devinterp_llc_settings()``
    (as ``devinterp.demo.InductionLM`` does) and ``module_settings`` is True, its dict fills what
    is not given here: the fields ``num_chains``, ``num_draws``, ``num_burnin``, ``localization``,
    ``nbeta``, ``batch_size`` and ``calibrate_kwargs`` (keyword arguments of
    :func:`~devinterp.analyses.calibrate`, e.g. ``num_steps``, ``max_draws``,
    ``min_acceptance``, ``budget``; those given here win key by key). This happens in
    :meth:`prepare`, which says on stderr where each setting came from; the results key keeps the
    configuration given here (pass ``--force`` after changing a module's settings).

    **Minibatch.** Without a ``batch_size`` from either, and unless the data is a DataLoader
    (whose batch size is kept), the chains use minibatches of ``default_batch_size`` (64; None:
    ``estimate_llc``'s full batch up to 512). A snapshot's cost is the budget's model
    evaluations × the batch: a post-hoc run evaluates many snapshots, so it takes minibatches
    as devinterp (timaeus) users do, and as the demo does online.
    """

    num_chains: int | None = None
    num_draws: int | None = None
    num_burnin: int | None = None
    step_size: float | str = "auto"
    localization: float | None = None
    nbeta: float | None = None
    batch_size: int | None = None
    sampler: str = "sgld"
    vectorize: bool | str = False
    budget: int | None = 5000
    name: str = "llc"
    calibration: Any = field(default=None, compare=False, repr=False)
    calibrate_kwargs: Mapping[str, Any] | None = None
    module_settings: bool = True
    default_batch_size: int | None = 64
    settings_source: str | None = field(default=None, compare=False)
    num_acceptance_checks: int | None = None

    needs_data = True

    def __post_init__(self):
        for key in ("num_chains", "num_draws", "batch_size", "budget", "num_acceptance_checks"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        if self.num_burnin is not None and (isinstance(self.num_burnin, bool) or not isinstance(self.num_burnin, int)
                                            or self.num_burnin < 0):
            raise InvalidInputError(f"num_burnin must be an integer >= 0, got {self.num_burnin!r}")
        if self.step_size != "auto":
            if not isinstance(self.step_size, (int, float)) or not self.step_size > 0 or not math.isfinite(self.step_size):
                raise InvalidInputError(f"step_size must be a positive number or 'auto', got {self.step_size!r}")
        if self.localization is not None and not (isinstance(self.localization, (int, float)) and self.localization >= 0):
            raise InvalidInputError(f"localization must be a number >= 0, got {self.localization!r}")
        if self.nbeta is not None and not (isinstance(self.nbeta, (int, float)) and self.nbeta > 0):
            raise InvalidInputError(f"nbeta must be a positive number or None, got {self.nbeta!r}")
        if self.vectorize not in (True, False, "auto"):
            raise InvalidInputError(f"vectorize must be True, False or 'auto', got {self.vectorize!r}")
        if self.calibrate_kwargs is not None:
            _check_calibrate_kwargs(self.calibrate_kwargs, "calibrate_kwargs")
        if self.default_batch_size is not None:
            _positive_int("default_batch_size", self.default_batch_size)

    def config(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("calibration")
        d.pop("name")
        d.pop("settings_source")
        # the defaults of later fields stay out: results keyed before they existed stay valid
        if d["calibrate_kwargs"] is None:
            d.pop("calibrate_kwargs")
        else:
            d["calibrate_kwargs"] = dict(sorted(d["calibrate_kwargs"].items()))
        if d["module_settings"]:
            d.pop("module_settings")
        if d["num_acceptance_checks"] is None:
            d.pop("num_acceptance_checks")
        return d

    def with_module_settings(self, model: nn.Module) -> LLCAnalysis:
        """Fill what is not given from ``model.devinterp_llc_settings()`` (if it defines one).

        Raises:
            FactoryError: The hook fails or returns something else than a dict of known settings.
        """
        from devinterp.errors import FactoryError

        hook = getattr(model, "devinterp_llc_settings", None)
        if not self.module_settings or not callable(hook) or self.settings_source is not None:
            return self
        label = f"{type(model).__name__}.devinterp_llc_settings()"
        try:
            settings = hook()
        except Exception as exc:
            raise FactoryError(f"{label} failed ({type(exc).__name__}: {exc}); pass the --llc-* options "
                               f"and --llc-ignore-module-settings") from exc
        if not isinstance(settings, Mapping):
            raise FactoryError(f"{label} returned {type(settings).__name__}, not a dict of LLC settings")
        unknown = sorted(set(settings) - set(_MODULE_KEYS) - {"calibrate_kwargs"})
        if unknown:
            raise FactoryError(f"{label} returned unknown settings {unknown}; known: "
                               f"{sorted(_MODULE_KEYS) + ['calibrate_kwargs']}")
        updates: dict[str, Any] = {k: settings[k] for k in _MODULE_KEYS
                                   if k in settings and getattr(self, k) is None}
        cal_kw = settings.get("calibrate_kwargs") or {}
        if not isinstance(cal_kw, Mapping):
            raise FactoryError(f"{label}: calibrate_kwargs must be a dict, got {type(cal_kw).__name__}")
        merged = {**cal_kw, **(self.calibrate_kwargs or {})}
        if merged:
            updates["calibrate_kwargs"] = merged
        try:
            return replace(self, **updates, settings_source=label)
        except InvalidInputError as exc:
            raise FactoryError(f"{label}: {exc}") from exc

    def describe_settings(self) -> str:
        """One line: the settings in use and where they came from."""
        keys = _MODULE_KEYS
        parts = [f"{k}={getattr(self, k)}" for k in keys if getattr(self, k) is not None]
        parts.append(f"step_size={self.step_size}")
        parts.append(f"budget={self.budget}")
        if self.calibrate_kwargs:
            parts.append("calibrate(" + ", ".join(f"{k}={v}" for k, v in sorted(self.calibrate_kwargs.items())) + ")")
        src = (f"from {self.settings_source} (command-line --llc-* options win)" if self.settings_source
               else "from the command line, the rest estimate_llc's and calibrate's defaults")
        return f"LLC settings {src}: " + ", ".join(parts)

    def _given(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _MODULE_KEYS if getattr(self, k) is not None}

    def prepare(self, model: nn.Module, context: AnalysisContext) -> LLCAnalysis:
        """The module's settings (:meth:`with_module_settings`), then with ``step_size="auto"``
        the calibration: loaded, or computed on the given snapshot."""
        import sys

        if self.settings_source is None and self.calibration is None:
            filled = self.with_module_settings(model)
            note = ""
            if (filled.batch_size is None and filled.default_batch_size is not None
                    and not isinstance(context.data, torch.utils.data.DataLoader)):
                filled = replace(filled, batch_size=filled.default_batch_size)
                note = (f"; minibatch {filled.default_batch_size} is the post-hoc default "
                        "(--llc-batch-size N; N >= the data size: full batch)")
            if context.progress is not False:
                print(f"devinterp analyze: {filled.describe_settings()}{note}", file=sys.stderr, flush=True)
            return replace(filled, settings_source=filled.settings_source or "")._calibrated(model, context)
        return self._calibrated(model, context)

    def _calibrated(self, model: nn.Module, context: AnalysisContext) -> LLCAnalysis:
        if self.step_size != "auto" or self.calibration is not None:
            return self
        import sys
        from pathlib import Path

        from devinterp.analyses.calibration import Calibration, calibrate

        path = Path(context.workdir or ".") / f"calibration-{config_hash(self.name, self.config())}.json"
        if path.exists():
            cal = Calibration.from_dict(json.loads(path.read_text()))
        else:
            if context.data is None or context.loss_fn is None:
                raise InvalidInputError("calibrating the LLC needs data and a loss function (see --data and --loss)")
            import time

            model.eval()
            if context.progress is not False:  # announced even when stderr is not a terminal
                print(f"devinterp analyze: calibrating the LLC sampler once, at step {context.step} "
                      f"(reused for every snapshot; saved as {path.name}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            kwargs = {k: v for k, v in self._given().items() if k in ("localization", "nbeta", "batch_size")}
            if self.num_chains is not None:
                kwargs["num_chains"] = self.num_chains
            kwargs["budget"] = self.budget
            kwargs.update(self.calibrate_kwargs or {})
            cal = calibrate(model, context.data, context.loss_fn, sampler=self.sampler, seed=context.step_seed,
                            device=context.device, vectorize=self.vectorize,
                            progress=context.progress, **kwargs)
            if context.progress is not False:
                print(f"devinterp analyze: calibrated in {time.perf_counter() - t0:.0f} s: "
                      f"{_describe_calibration(cal)}", file=sys.stderr, flush=True)
            if not cal.ok:  # on the console, not only in the JSON
                print("devinterp analyze: LLC calibration fell back (ok: false): "
                      + "; ".join(cal.warnings), file=sys.stderr, flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(cal.to_dict(), indent=2))
            tmp.replace(path)
        if context.progress is not False:
            print(f"devinterp analyze: {_llc_cost_line(cal, self)}", file=sys.stderr, flush=True)
        return replace(self, calibration=cal)

    def compute(self, model: nn.Module, snapshot: Any, context: AnalysisContext) -> dict[str, float]:
        from devinterp.analyses import estimate_llc

        if context.data is None or context.loss_fn is None:
            raise InvalidInputError("the LLC needs data and a loss function (see --data and --loss)")
        model.eval()
        kwargs: dict[str, Any] = dict(self._given(), sampler=self.sampler, seed=context.step_seed,
                                      device=context.device, vectorize=self.vectorize,
                                      budget=self.budget, progress=False)
        if self.step_size == "auto":
            kwargs["step_size"] = "auto"
            if self.calibration is not None:
                kwargs["calibration"] = self.calibration
        else:
            kwargs["step_size"] = float(self.step_size)
        import warnings

        from devinterp.errors import DevinterpWarning

        with warnings.catch_warnings():  # their texts go into the record's notes, not on stderr
            warnings.simplefilter("ignore", DevinterpWarning)
            result = estimate_llc(model, context.data, context.loss_fn, **kwargs)
        context.notes.extend(result.warnings)
        return _finite_scalars(result.scalars())


#: Settings a module's ``devinterp_llc_settings()`` may give besides ``calibrate_kwargs``.
_MODULE_KEYS = ("num_chains", "num_draws", "num_burnin", "localization", "nbeta", "batch_size",
                "num_acceptance_checks")
#: ``calibrate`` arguments that ``LLCAnalysis`` sets itself (not through ``calibrate_kwargs``).
_OWN_CALIBRATE_ARGS = ("model", "data", "loss_fn", "sampler", "seed", "device", "vectorize", "progress",
                       "localization", "nbeta", "batch_size", "num_chains", "params", "_meter")


def _check_calibrate_kwargs(kwargs: Any, what: str) -> None:
    import inspect

    from devinterp.analyses.calibration import calibrate

    if not isinstance(kwargs, Mapping):
        raise InvalidInputError(f"{what} must be a dict of calibrate() options, got {type(kwargs).__name__}")
    known = set(inspect.signature(calibrate).parameters) - set(_OWN_CALIBRATE_ARGS)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InvalidInputError(f"{what}: unknown calibrate() options {unknown} (known: {sorted(known)}; "
                                f"chains, γ, nβ and the minibatch are LLCAnalysis fields)")


_VOCAB_KEYS = ("vocab_size", "d_vocab", "n_vocab", "vocab")
_SEQ_KEYS = ("seq_len", "n_ctx", "context_length", "max_seq_len", "block_size", "n_positions",
             "max_position_embeddings")


def hparam_lookup(hparams: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    """The first integer found under one of ``keys`` in ``hparams`` (searched one level deep too)."""
    for k in keys:
        v = hparams.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    for v in hparams.values():
        if isinstance(v, Mapping):
            found = hparam_lookup(v, keys)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class CircuitAnalysis:
    """Induction / previous-token head scores and the ICL score of each snapshot.

    Calls :func:`devinterp.analyses.induction_scores` and :func:`devinterp.analyses.icl_score` with
    the same sequences (``context.seed``) at every snapshot, like ``CircuitCallback``.

    Args:
        vocab_size: Tokens are drawn from ``[0, vocab_size)``; None: read from the run's
            hyper-parameters (``vocab_size``, ``d_vocab``, ``n_vocab`` or ``vocab``).
        seq_len: Length of the repeated random sequences; None: the run's ``seq_len`` / ``n_ctx``
            ... hyper-parameter if recorded, else 64.
        num_sequences: Sequences averaged over.
        copying: Also compute the behavioural copying score.
        icl: Also compute ``icl_score``.
        model_attr: Score ``getattr(model, model_attr)`` instead of the model itself.
        weights: Also the weight-space circuits (composition, OV copying, positional QK), as
            ``CircuitCallback(weights=...)``: ``"auto"``, ``True`` or ``False``.
        weight_kinds: Composition kinds computed.
    """

    vocab_size: int | None = None
    seq_len: int | None = None
    num_sequences: int = 32
    bos_token: int | None = None
    copying: bool = False
    icl: bool = True
    model_attr: str | None = None
    weights: bool | str = "auto"
    weight_kinds: tuple[str, ...] = ("Q", "K", "V")
    name: str = "circuits"

    needs_data = False

    def __post_init__(self):
        for key in ("vocab_size", "seq_len"):
            v = getattr(self, key)
            if v is not None:
                _positive_int(key, v)
        _positive_int("num_sequences", self.num_sequences)
        if self.weights not in (True, False, "auto"):
            raise InvalidInputError(f"weights must be True, False or 'auto', got {self.weights!r}")
        if not set(self.weight_kinds) <= {"Q", "K", "V"}:
            raise InvalidInputError(f"weight_kinds must be among 'Q', 'K', 'V', got {self.weight_kinds!r}")

    def config(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        return d

    def prepare(self, model: nn.Module, context: AnalysisContext) -> CircuitAnalysis:
        """Fill ``vocab_size`` and ``seq_len`` from the run's hyper-parameters when not given."""
        vocab = self.vocab_size or hparam_lookup(context.hparams, _VOCAB_KEYS)
        if vocab is None:
            raise InvalidInputError(
                "circuit scores need the vocabulary size and the run records none "
                f"(looked for {list(_VOCAB_KEYS)} in its hyper-parameters); pass --vocab-size N"
            )
        seq = self.seq_len or hparam_lookup(context.hparams, _SEQ_KEYS) or 64
        ready = replace(self, vocab_size=vocab, seq_len=min(seq, 64) if self.seq_len is None else seq)
        # before any snapshot is analysed: the options must fit the model (context, vocabulary)
        from devinterp.analyses.circuits import check_scoring_inputs

        try:
            check_scoring_inputs(ready._target(model), vocab_size=ready.vocab_size, seq_len=ready.seq_len,
                                 bos_token=ready.bos_token, device=context.device)
        except InvalidInputError as exc:
            raise InvalidInputError(f"circuit scores: {exc} (--vocab-size / --seq-len)") from exc
        return ready

    def _target(self, model: nn.Module) -> nn.Module:
        if not self.model_attr:
            return model
        target = getattr(model, self.model_attr, None)
        if not isinstance(target, nn.Module):
            raise InvalidInputError(f"model_attr={self.model_attr!r}: {type(model).__name__} has no such submodule")
        return target

    def compute(self, model: nn.Module, snapshot: Any, context: AnalysisContext) -> dict[str, float]:
        from devinterp.analyses import icl_score, induction_scores

        target = model
        if self.model_attr:
            target = getattr(model, self.model_attr, None)
            if not isinstance(target, nn.Module):
                raise InvalidInputError(f"model_attr={self.model_attr!r}: {type(model).__name__} has no such submodule")
        if self.vocab_size is None:
            raise InvalidInputError("CircuitAnalysis.vocab_size is unset; call prepare() or pass it")
        seq = self.seq_len or 64
        common = dict(vocab_size=self.vocab_size, seq_len=seq, num_sequences=self.num_sequences,
                      seed=context.seed, bos_token=self.bos_token, device=context.device)
        with torch.no_grad():
            values = dict(induction_scores(target, copying=self.copying, **common).scalars())
            if self.icl:
                values["icl_score"] = float(icl_score(target, None, **common))
        from devinterp.analyses.composition import weight_scalars

        values.update(weight_scalars(target, self.weights, tuple(self.weight_kinds)))
        return _finite_scalars(values)


def _describe_calibration(cal: Any) -> str:
    """One line for the console: what the calibration chose."""
    return (f"step_size={cal.step_size:.3g}, localization={cal.localization:.3g}, nbeta={cal.nbeta:.3g}, "
            f"{cal.num_chains} chains x ({cal.num_burnin} burn-in + {cal.num_draws} draws)"
            + ("" if cal.ok else " (fallback)"))


def _llc_cost_line(cal: Any, llc: LLCAnalysis) -> str:
    """What each snapshot's LLC will cost, at the pace the calibration measured."""
    chains = llc.num_chains or cal.num_chains
    wanted = chains * ((llc.num_burnin if llc.num_burnin is not None else cal.num_burnin)
                       + (llc.num_draws or cal.num_draws))
    evals = wanted if llc.budget is None else min(wanted, llc.budget)
    pace = cal.seconds / cal.cost if getattr(cal, "cost", 0) and cal.seconds else None
    eta = "" if pace is None else f" (about {_duration(evals * pace)} per snapshot at the calibration's pace)"
    return (f"LLC: up to {evals:,} model evaluations per snapshot{eta}; "
            "--llc-budget N (or --llc-draws/--llc-chains) makes it cheaper")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
