"""The demo: induction heads forming in a small transformer, tracked end to end.

Trains the reference 2-layer attention-only transformer (:func:`devinterp.models.induction_recipe`)
on its synthetic Markov data with Lightning, with the four devinterp callbacks attached:

- :class:`~devinterp.callbacks.SnapshotCallback` (weights at log-spaced steps),
- :class:`~devinterp.callbacks.LLCCallback` (the LLC on a copy of the weights),
- :class:`~devinterp.callbacks.CircuitCallback` (induction / previous-token scores, ICL score),
- :class:`~devinterp.callbacks.TransitionCallback` (flags the phase transitions online),

then writes the summary figure and JSON (:mod:`devinterp.report`) and the TensorBoard extras
(custom-scalars layout, hyper-parameters, the figure). ``devinterp demo`` runs it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from devinterp.analyses.transitions import Transition, detect_stages
from devinterp.data import InductionData
from devinterp.errors import InvalidInputError
from devinterp.models import AttentionOnlyTransformer, InductionRecipe, induction_recipe
from devinterp.schedules import every, log_spaced

__all__ = ["DemoConfig", "DemoResult", "InductionLM", "SyntheticBatches", "demo_config", "demo_llc_settings",
           "half_crossing",
           "prepare_output", "run_demo", "token_loss"]

#: Marks a directory as the output of ``devinterp demo`` (so a re-run may replace it).
MARKER = ".devinterp-demo"


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo run depends on (logged as the TensorBoard hyper-parameters).

    Attributes:
        steps: Optimizer steps.
        circuit_points: Log-spaced steps at which heads are scored...
        circuit_every: ...plus every this many steps.
        llc_points: Log-spaced LLC estimates from ``llc_start`` (plus step 0).
        llc_start: First log-spaced LLC step.
        llc_samples: Sequences in the fixed LLC data set (n).
        llc_calibrate: Calibrate the sampler once (``devinterp.analyses.calibrate``, pilot chains
            of ``llc_calibration_steps`` steps, ``llc_min_acceptance``) at the first LLC step >=
            ``llc_calibrate_at`` -- once the induction head has formed, near a minimum -- and
            reuse it for every estimate (the earlier ones are deferred until then: see
            ``LLCCallback(calibrate_at=...)``); ``llc_draws``/``llc_burnin`` then bound the chain
            lengths it may choose (from ``llc_min_length``). Without it, ``llc_step_size`` and
            those lengths are used as is (hand-tuned settings, ``--no-calibrate``).
        llc_calibrate_at: The step from which the calibration is made (see ``llc_calibrate``).
        llc_calibration_budget: The ``budget`` the calibration plans within (its pilots get
            40%: the whole grid of 6 pilots of ``llc_calibration_steps``); the estimates keep
            the default budget (they cost far less: 2 chains × at most 200 steps).
        llc_min_acceptance: The calibration's ``min_acceptance``. 0.6, not 0.75: the pilots'
            acceptance (checked from a quarter of each pilot on) reads lower than the
            estimates' (after burn-in; 0.642 against 0.76–0.84 at ε = 1.08e-3 in ``--quick``),
            and 0.75 let the calibration pick ε = 1.35e-4, at which the localization pulls the
            chains in over ~1/(εγ/2) ≈ 150 steps, more than the demo's chains: every estimate
            then carried R-hat/trend warnings and read ~35% low.
        llc_acceptance_checks: MALA acceptance checks per estimate (``num_acceptance_checks``;
            one extra evaluation per chain each). The default (``num_draws // 30``: 2–3)
            makes a mean of 4–6 values, each exactly 1 more than half the time, so a mean of
            1.000 — a warning and a recalibration — came by chance in 4 of the default run's
            33 estimates.
        llc_chains, llc_draws, llc_burnin: SGLD chains and their (maximal) lengths.
        llc_step_size, llc_localization, llc_batch_size: SGLD ε (without calibration), γ and the
            minibatch size.
        snapshot_points: Log-spaced weight snapshots (plus step 0).
        loss_points: Log-spaced samples of ``loss/train`` for the transition detector.
        check_every: How often the transition detector runs.
        score_sequences: Repeated random sequences per head scoring.
    """

    steps: int = 2000
    circuit_points: int = 60
    circuit_every: int = 20
    llc_points: int = 32
    llc_start: int = 8
    llc_samples: int = 512
    llc_calibrate: bool = True
    llc_calibrate_at: int = 500
    llc_calibration_steps: int = 200
    llc_calibration_budget: int = 8000
    llc_min_acceptance: float = 0.6
    llc_acceptance_checks: int = 16
    llc_min_length: int = 50
    llc_chains: int = 2
    llc_draws: int = 100
    llc_burnin: int = 100
    llc_step_size: float = 2e-4
    llc_localization: float = 100.0
    llc_batch_size: int = 16
    snapshot_points: int = 60
    loss_points: int = 200
    check_every: int = 100
    transition_range_factor: float = 40.0
    score_sequences: int = 32
    recipe: InductionRecipe = field(default_factory=induction_recipe)

    def hparams(self) -> dict[str, Any]:
        """Flat hyper-parameters (the recipe's fields prefixed ``recipe/``)."""
        out = {k: v for k, v in asdict(self).items() if k != "recipe"}
        for k, v in self.recipe.to_dict().items():
            out[f"recipe/{k}"] = str(v) if isinstance(v, tuple) else v
        return out


def demo_llc_settings(cfg: DemoConfig | None = None) -> dict[str, Any]:
    """The demo's LLC settings as ``devinterp analyze`` takes them (``devinterp_llc_settings``).

    The keyword arguments of ``estimate_llc`` (chains, minibatch, localization, and the chain
    lengths the demo's calibration may choose at most) and, under ``calibrate_kwargs``, those of
    ``calibrate`` (pilot length, length bounds, acceptance, grid top and the calibration budget),
    read from ``cfg`` (default: the default demo's).
    """
    cfg = cfg or DemoConfig()
    return dict(
        num_chains=cfg.llc_chains, num_draws=cfg.llc_draws, num_burnin=cfg.llc_burnin,
        localization=cfg.llc_localization, batch_size=cfg.llc_batch_size,
        num_acceptance_checks=cfg.llc_acceptance_checks,
        calibrate_kwargs=dict(
            num_steps=cfg.llc_calibration_steps, min_burnin=cfg.llc_min_length,
            max_burnin=cfg.llc_burnin, min_draws=cfg.llc_min_length, max_draws=cfg.llc_draws,
            target_ess=2 * cfg.llc_min_length, min_acceptance=cfg.llc_min_acceptance,
            grid_top=2.0, budget=cfg.llc_calibration_budget),
    )


def demo_config(*, quick: bool = False) -> DemoConfig:
    """The default demo (≈5 min on 2 CPU cores) or the quick one used by the tests (≈1 min).

    The induction head forms around step 150; a transition is flagged once the detector's window
    (a factor e in steps) has passed, so even the quick run trains to step 600.
    """
    if not quick:
        return DemoConfig()
    return DemoConfig(steps=600, circuit_points=40, circuit_every=10, llc_points=8, llc_start=10,
                      llc_samples=256, llc_calibrate_at=300, llc_calibration_steps=100, llc_min_length=40,
                      llc_draws=80, llc_burnin=60, llc_step_size=3e-4,
                      snapshot_points=20, loss_points=150, check_every=100)


# ----------------------------------------------------------------------------------------------
# model and data
# ----------------------------------------------------------------------------------------------
def token_loss(model: torch.nn.Module, batch: Tensor | tuple | list) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on token sequences ``(batch, T)``."""
    tokens = batch if isinstance(batch, Tensor) else batch[0]
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class SyntheticBatches(IterableDataset):
    """An endless stream of batches ``(batch_size, n_ctx)`` from :class:`InductionData` (seeded)."""

    def __init__(self, data: InductionData, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def __iter__(self) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.data.sample(self.batch_size, generator=gen)


class InductionLM(pl.LightningModule):
    """A LightningModule training :class:`AttentionOnlyTransformer` with the recipe's optimiser.

    ``forward(tokens)`` returns the logits, so the module itself can be scored by
    ``CircuitCallback``; ``self.model`` is the bare network. Logs ``loss/train`` every step.

    Its hyper-parameters (the recipe as a dict, the seed and the LLC sample size) are saved, so
    ``devinterp analyze`` rebuilds it from the store's ``run.json``; :meth:`devinterp_data` gives
    the LLC data the demo measured on, which ``devinterp analyze`` uses when no ``--data`` is given,
    and :meth:`devinterp_llc_settings` the demo's LLC settings (``llc``, recorded in the
    hyper-parameters; the default demo's when the run recorded none), which it uses as defaults.
    """

    def __init__(self, recipe: InductionRecipe | Mapping[str, Any] | None = None, seed: int = 0,
                 llc_samples: int = 512, llc: Mapping[str, Any] | None = None):
        super().__init__()
        if recipe is None:
            recipe = induction_recipe()
        elif isinstance(recipe, Mapping):  # from run.json: JSON turned tuples into lists
            recipe = InductionRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()})
        hp = {"recipe": recipe.to_dict(), "seed": seed, "llc_samples": llc_samples}
        if llc is not None:
            hp["llc"] = dict(llc)
        self.save_hyperparameters(hp)
        self.llc = dict(llc) if llc is not None else None
        self.recipe = recipe
        self.seed = seed
        self.llc_samples = llc_samples
        self.model: AttentionOnlyTransformer = recipe.build_model(seed)

    def devinterp_data(self) -> Tensor:
        """The fixed LLC data set: ``llc_samples`` sequences of the recipe's data (seeded)."""
        data = self.recipe.build_data(self.seed)
        return data.sample(self.llc_samples, generator=torch.Generator().manual_seed(self.seed + 3))

    def devinterp_llc_settings(self) -> dict[str, Any]:
        """The demo's LLC settings (see :func:`demo_llc_settings`): ``devinterp analyze``'s defaults."""
        return copy.deepcopy(self.llc) if self.llc is not None else demo_llc_settings()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = token_loss(self.model, batch)
        self.log("loss/train", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = self.recipe.build_optimizer(self.model)
        warmup = max(1, self.recipe.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoResult:
    """What the demo found.

    Attributes:
        out: The output directory.
        logdir: The TensorBoard log directory (``out/tensorboard``).
        transitions: The transitions flagged online by ``TransitionCallback``.
        stages: ``(step, start, end, metrics)`` of the stage boundaries found by ``detect_stages``
            over the recorded curves at the end.
        induction_heads: ``{"L1H0": score}`` of the heads whose final induction score > 0.5.
        final: Final values (``loss/train``, ``llc/mean``, ``llc/stderr``, ``icl_score``).
        seconds: Wall time of the whole demo.
        llc_seconds: Of which spent estimating the LLC.
        circuits: One line per induction circuit read from the weights
            (:func:`devinterp.report.induction_circuits`): previous-token head → induction head,
            their K-composition from first to last step, and when it rose.
    """

    out: Path
    logdir: Path
    transitions: tuple[Transition, ...]
    stages: tuple[tuple[float, float, float, tuple[str, ...]], ...]
    induction_heads: dict[str, float]
    final: dict[str, float]
    seconds: float
    llc_seconds: float
    circuits: tuple[str, ...] = ()

    def tensorboard_command(self) -> str:
        return f"tensorboard --logdir {self.logdir}"

    def summary_lines(self) -> list[str]:
        """The short terminal summary."""
        lines = [f"devinterp demo finished in {self.seconds:.0f} s "
                 f"({self.llc_seconds:.0f} s of it estimating the LLC)", ""]
        if self.transitions:
            lines.append(f"Transitions flagged during training ({len(self.transitions)}):")
            lines += [f"  step {t.step:>6g}  {t.describe()}" for t in
                      sorted(self.transitions, key=lambda t: t.step)]
        else:
            lines.append("No transition was flagged during training.")
        if self.stages:
            bounds = ", ".join(f"{s:g} ({'+'.join(m)})" for s, _, _, m in self.stages)
            spans = [0.0] + [s for s, _, _, _ in self.stages]
            lines.append(f"Stages: {len(self.stages) + 1}, boundaries at steps {bounds}")
            lines.append("  " + " | ".join(f"stage {i}: from step {a:g}" for i, a in enumerate(spans)))
        if self.induction_heads:
            heads = ", ".join(f"{h} ({s:.2f})" for h, s in
                              sorted(self.induction_heads.items(), key=lambda kv: -kv[1]))
            lines.append(f"Induction heads (final score > 0.5): {heads}")
        else:
            lines.append("No head became an induction head (final score > 0.5).")
        if self.circuits:
            lines.append("Circuits (from the weights):")
            lines += [f"  {c}" for c in self.circuits]
        f = self.final
        if "llc/mean" in f:
            err = f" ± {f['llc/stderr']:.1f}" if "llc/stderr" in f else ""
            lines.append(f"Final LLC: {f['llc/mean']:.1f}{err}   final training loss: "
                         f"{f.get('loss/train', math.nan):.3f}   ICL score: {f.get('icl_score', math.nan):.2f}")
        lines += ["", f"Summary: {self.out / 'summary.png'}, {self.out / 'summary.json'}",
                  f"Snapshots: {self.out / 'snapshots'}", "View it in TensorBoard:",
                  f"  {self.tensorboard_command()}"]
        return lines


def _demo_owned(rel: str) -> bool:
    """Whether ``rel`` (a file path relative to the output directory) is something a demo writes."""
    parts = rel.split("/")
    if rel in (MARKER, "summary.png", "summary.json"):
        return True
    if parts[0] == "snapshots":  # the demo's snapshot store (its analysis/ folder is the user's)
        return (len(parts) == 2 and parts[1] in ("index.jsonl", "run.json", "writer.lock")) or (
            len(parts) == 3 and parts[1] == "snapshots")
    if parts[0] == "tensorboard" and len(parts) == 2:  # the demo's own events (subfolders are the user's)
        return parts[1].startswith("events.out.tfevents.") or parts[1] == "hparams.yaml"
    return False


def prepare_output(out: str | Path, *, force: bool = False, echo: Callable[[str], None] | None = None) -> Path:
    """Create ``out``, or clear a previous demo's own outputs there, keeping everything else.

    A re-run replaces only what a demo writes (its snapshot store, TensorBoard events, summary).
    Files it did not write (e.g. the results ``devinterp analyze`` saved in ``snapshots/analysis``)
    make it refuse, unless ``force``: then those inside the demo's folders (which would describe
    the old weights) are moved to ``out/previous-<time>/`` and any others stay where they are.

    Raises:
        InvalidInputError: ``out`` is a file.
        OutputExistsError: ``out`` is not a demo's output, or holds files the demo did not write
            (without ``force``).
        StoreLockedError: A demo is writing there right now.
    """
    from devinterp.errors import OutputExistsError
    from devinterp.store import WriterLock, _make_fs

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file, not a folder: give a folder path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"--out {out}: {parent} is a file, not a folder")
            break
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise OutputExistsError(
                f"--out {out} is not empty and was not written by `devinterp demo`; choose a new or empty --out"
            )
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink())
        foreign = [f for f in files if not _demo_owned(f)]
        if foreign and not force:
            raise OutputExistsError(
                f"--out {out} holds {len(foreign)} file(s) that `devinterp demo` did not write (e.g. {foreign[0]}); "
                f"nothing was changed. Choose another --out, or pass --force to re-run here (those inside the "
                f"demo's folders are then moved to {out}/previous-<time>/, the others stay)"
            )
        store_dir = out / "snapshots"
        lock = None
        if store_dir.is_dir():  # a demo writing there right now keeps its folder
            lock = WriterLock(_make_fs(store_dir), what="snapshot store", purpose="devinterp demo (re-run check)",
                              advice="Another `devinterp demo` is writing there: wait for it or choose another --out.")
            lock.acquire()
        try:
            moved = [f for f in foreign if f.split("/")[0] in ("snapshots", "tensorboard")]
            if moved:
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                keep = out / f"previous-{stamp}"
                for rel in moved:
                    dest = keep / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    (out / rel).rename(dest)
                if echo is not None:
                    echo(f"devinterp demo: kept {len(moved)} file(s) of the previous run that the demo did not "
                         f"write (e.g. {moved[0]}) in {keep}")
            for rel in files:
                if _demo_owned(rel) and rel != "snapshots/writer.lock":
                    (out / rel).unlink(missing_ok=True)
        finally:
            if lock is not None:
                lock.release()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `devinterp demo`; a re-run replaces the demo's own outputs here "
                              "and keeps any other file\n")
    return out


def _series(history: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    pts = history.get(name, [])
    return (np.array([s for s, _ in pts], dtype=float), np.array([v for _, v in pts], dtype=float))


def _stages(history: dict, head_tags: list[str]) -> tuple:
    """Stage boundaries agreed over loss, LLC, the best head's induction score and the ICL score."""
    curves: dict[str, tuple] = {}
    steps, loss = _series(history, "loss/train")
    if len(steps) >= 20:
        curves["loss/train"] = (steps, loss)
    steps, llc = _series(history, "llc/mean")
    _, err = _series(history, "llc/stderr")
    if len(steps) >= 20 and len(err) == len(steps) and np.all(err > 0):
        curves["llc"] = (steps, llc, err)
    finals = {t: history[t][-1][1] for t in head_tags if history.get(t)}
    if finals:
        best = max(finals, key=finals.get)
        steps, score = _series(history, best)
        if len(steps) >= 20:
            curves[best] = (steps, score)
    steps, icl = _series(history, "icl_score")
    if len(steps) >= 20:
        curves["icl_score"] = (steps, icl)
    if not curves:
        return ()
    res = detect_stages(curves, llc_key="llc" if "llc" in curves else None)
    return tuple((float(b.step), float(b.start), float(b.end), tuple(b.metrics))
                 for b in res.boundaries)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    seed: int = 0,
    config: DemoConfig | None = None,
    calibrate: bool | None = None,
    threads: int | None = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    force: bool = False,
) -> DemoResult:
    """Train the reference transformer with every devinterp callback and write the summary.

    Args:
        out: Output directory (created; a previous demo's outputs there are replaced).
        quick: The short configuration (see :func:`demo_config`).
        seed: Seeds the model, the data, the scoring sequences and the LLC chains.
        config: Overrides ``quick``.
        calibrate: Overrides ``config.llc_calibrate`` (``False``: the hand-tuned LLC settings instead
            of calibrating once at ``config.llc_calibrate_at``).
        threads: Torch intra-op threads during the run (restored afterwards); ``None`` leaves
            torch's default. The model is tiny: one thread was 3-7x faster than two on a loaded
            2-core machine (threads fight over cores for microsecond-sized operations).
        progress: Show Lightning's progress bar.
        echo: Where progress messages go.
        force: Re-run over a previous demo whose folder holds files the demo did not write
            (they are kept: see :func:`prepare_output`); without it such a re-run is refused.

    Returns:
        A :class:`DemoResult`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidInputError(f"threads must be a positive integer or None, got {threads!r}")
    cfg = config or demo_config(quick=quick)
    if calibrate is not None:
        cfg = replace(cfg, llc_calibrate=bool(calibrate))
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out, quick=quick, seed=seed, cfg=cfg,
                    progress=progress, echo=echo, force=force)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out, *, quick: bool, seed: int, cfg: DemoConfig, progress: bool,
         echo: Callable[[str], None], force: bool = False) -> DemoResult:
    from lightning.pytorch.loggers import TensorBoardLogger

    from devinterp.callbacks import (
        CircuitCallback,
        LLCCallback,
        SnapshotCallback,
        TransitionCallback,
    )
    from devinterp.callbacks._logging import metric_history
    from devinterp.report import (
        describe_circuit,
        induction_circuits,
        save_summary_png,
        summary_dict,
        summary_figure,
    )
    from devinterp.tensorboard import read_scalars, write_layout

    recipe = cfg.recipe
    t_start = time.perf_counter()
    out = prepare_output(out, force=force, echo=echo)
    torch.manual_seed(seed)

    train_data = recipe.build_data(seed)
    loader = DataLoader(SyntheticBatches(train_data, recipe.batch_size, seed + 1), batch_size=None)
    module = InductionLM(recipe, seed, llc_samples=cfg.llc_samples, llc=demo_llc_settings(cfg))
    llc_tokens = module.devinterp_data()

    heads = [f"L{layer}H{head}" for layer in range(recipe.n_layers) for head in range(recipe.n_heads)]
    induction_tags = [f"induction/{h}" for h in heads]
    composition_tags = [f"composition/K/L{l1}H{h1}->L{l2}H{h2}" for l1 in range(recipe.n_layers)
                        for h1 in range(recipe.n_heads) for l2 in range(l1 + 1, recipe.n_layers)
                        for h2 in range(recipe.n_heads)]
    llc_common = dict(num_chains=cfg.llc_chains, localization=cfg.llc_localization,
                      batch_size=cfg.llc_batch_size, seed=seed,
                      num_acceptance_checks=cfg.llc_acceptance_checks)
    if cfg.llc_calibrate:  # once, after the head formed; chain lengths bounded by the budget
        llc_settings = dict(calibrate=True, calibrate_at=cfg.llc_calibrate_at, recalibrate=True,
                            calibrate_kwargs=dict(
            num_steps=cfg.llc_calibration_steps, min_burnin=cfg.llc_min_length,
            max_burnin=cfg.llc_burnin, min_draws=cfg.llc_min_length, max_draws=cfg.llc_draws,
            target_ess=2 * cfg.llc_min_length, min_acceptance=cfg.llc_min_acceptance,
            grid_top=2.0, budget=cfg.llc_calibration_budget),
            **llc_common)
    else:
        llc_settings = dict(calibrate=False, step_size=cfg.llc_step_size,
                            num_draws=cfg.llc_draws, num_burnin=cfg.llc_burnin, **llc_common)
    llc_cb = LLCCallback((llc_tokens,), token_loss, log_spaced(cfg.llc_points, start=cfg.llc_start),
                         model_getter=lambda m: m.model, **llc_settings)
    transitions_cb = TransitionCallback(
        ["loss/train", "llc/mean", "icl_score", *induction_tags, *composition_tags],
        sample_schedule=log_spaced(cfg.loss_points), check_every=cfg.check_every,
        # the weight-space curves move early (initialisation) and form late: judge an early move
        # against the range the curve reaches by formation, not the range seen so far
        range_factor=cfg.transition_range_factor,
    )
    callbacks = [
        SnapshotCallback(out / "snapshots", log_spaced(cfg.snapshot_points)),
        CircuitCallback(recipe.vocab_size, log_spaced(cfg.circuit_points) | every(cfg.circuit_every),
                        seq_len=recipe.n_ctx, num_sequences=cfg.score_sequences, seed=seed + 2,
                        model_attr="model"),
        llc_cb,
        transitions_cb,  # last: it reads what the others published at the same step
    ]
    logger = TensorBoardLogger(str(out), name="tensorboard", version="", default_hp_metric=False)
    write_layout(logger.experiment)
    trainer = pl.Trainer(
        max_steps=cfg.steps, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
        enable_progress_bar=progress, num_sanity_val_steps=0, default_root_dir=str(out),
    )
    echo(f"devinterp demo: training a {recipe.n_layers}-layer attention-only transformer "
         f"({sum(p.numel() for p in module.parameters()):,} parameters) for {cfg.steps} steps; "
         f"output in {out}")
    trainer.fit(module, loader)
    llc_seconds = sum(r.diagnostics.seconds for _, r in llc_cb.results)
    if llc_cb.calibration is not None:
        llc_seconds += float(getattr(llc_cb.calibration, "seconds", 0.0))

    # --- summary ------------------------------------------------------------------------------
    history = metric_history(trainer)
    writer = logger.experiment
    writer.flush()
    curves = read_scalars(logger.log_dir)
    transitions = tuple(sorted(transitions_cb.transitions, key=lambda t: t.step))
    stages = _stages(history, induction_tags)
    final_heads = {t.split("/", 1)[1]: float(curves[t][1][-1]) for t in induction_tags if t in curves}
    final = {k: float(curves[k][1][-1]) for k in ("loss/train", "llc/mean", "llc/stderr", "icl_score")
             if k in curves and len(curves[k][1])}
    title = f"devinterp demo (seed {seed}, {cfg.steps} steps)"
    save_summary_png(out / "summary.png", curves, transitions, title=title)
    summary = summary_dict(curves, transitions)
    summary["stages"] = [{"step": s, "start": a, "end": b, "metrics": list(m)} for s, a, b, m in stages]
    summary["induction_heads"] = {h: s for h, s in final_heads.items() if s > 0.5}
    summary["config"] = {"seed": seed, "quick": quick, **cfg.hparams()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    writer.add_figure("summary", summary_figure(curves, transitions, title=title),
                      global_step=cfg.steps)
    best = max(final_heads.values()) if final_heads else math.nan
    logger.log_hyperparams(
        {"seed": seed, "quick": quick, **cfg.hparams()},
        metrics={"hparams/final_loss": final.get("loss/train", math.nan),
                 "hparams/final_llc": final.get("llc/mean", math.nan),
                 "hparams/best_induction_score": best,
                 "hparams/transitions_flagged": float(len(transitions))},
    )
    logger.finalize("success")
    return DemoResult(
        out=out, logdir=Path(logger.log_dir), transitions=transitions, stages=stages,
        induction_heads={h: s for h, s in final_heads.items() if s > 0.5}, final=final,
        seconds=time.perf_counter() - t_start, llc_seconds=llc_seconds,
        circuits=tuple(describe_circuit(c) for c in induction_circuits(curves, transitions)),
    )


def half_crossing(steps: np.ndarray, values: np.ndarray) -> int | None:
    """First step where ``values`` reaches half its final value (None if it never does)."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=float)
    if not len(values) or not np.isfinite(values[-1]) or values[-1] <= 0:
        return None
    hit = np.nonzero(values >= values[-1] / 2)[0]
    return int(steps[hit[0]]) if len(hit) else None

