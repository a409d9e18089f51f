"""``CircuitCallback``: log induction / previous-token head scores and the ICL score during training.

A thin adapter: it resolves its schedule at fit start, and at each scheduled step (step 0 included)
calls :func:`devinterp.analyses.circuits.induction_scores` and
:func:`devinterp.analyses.circuits.icl_score` on the LightningModule (or one of its attributes),
then publishes ``induction/L{l}H{h}``, ``previous_token/L{l}H{h}``, ``duplicate_token/...``,
``*/max`` and ``icl_score`` through :func:`devinterp.callbacks._logging.log_scalars`; with
``weights`` also the weight-space circuits of
:func:`devinterp.analyses.composition.weight_circuit_scalars` (``composition/K/L0H0->L1H1``,
``ov_copying/L1H0``, ``qk_previous_token/L0H0``...).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from devinterp.analyses.circuits import check_scoring_inputs, icl_score, induction_scores
from devinterp.analyses.composition import weight_scalars
from devinterp.callbacks._gate import StepGate
from devinterp.callbacks._logging import log_scalars, tensorboard_writer
from devinterp.errors import InvalidInputError
from devinterp.schedules import Schedule, log_spaced
from devinterp.tensorboard import HeadRuns

__all__ = ["CircuitCallback"]


class CircuitCallback(pl.Callback):
    """Score attention heads at scheduled training steps.

    Args:
        vocab_size: Vocabulary of the model (random tokens are drawn from it).
        schedule: When to score (default ``log_spaced(30)`` up to the run's total steps); step 0 is
            always scored at fit start when training starts from scratch.
        seq_len: Length of the repeated random sequences (BOS included).
        num_sequences: Number of sequences per scoring.
        seed: Seed of the scoring sequences (the same ones at every step).
        bos_token: Optional BOS token put first.
        copying: Also compute the behavioural copying score (one extra forward per head).
        icl_tokens: Tokens ``(batch, T)`` for :func:`icl_score`; default: the repeated random
            sequences. ``None`` with ``icl=False`` skips it.
        icl: Whether to log ``icl_score``.
        icl_early: ``early`` argument of :func:`icl_score`.
        icl_late: ``late`` argument of :func:`icl_score`.
        model_attr: Score ``getattr(pl_module, model_attr)`` instead of the LightningModule itself
            (which must then map tokens to logits, or return an object with ``.logits``).
        weights: Also log the weight-space circuits (composition, OV copying, positional QK):
            ``"auto"`` (default) when the heads of the model, or of the first submodule whose heads
            can be read, are located (:mod:`devinterp.analyses.head_access`), ``True`` always
            (an unsupported model is an error), ``False`` never.
        weight_kinds: Composition kinds logged (``"Q"``, ``"K"``, ``"V"``).
        attention: How attention is read (see :func:`~devinterp.analyses.induction_scores`):
            ``"auto"`` (from the model's type), ``"sdpa"`` or an adapter such as
            :class:`~devinterp.analyses.ModuleAttention` for attention written by hand.
    """

    def __init__(
        self,
        vocab_size: int,
        schedule: Schedule | None = None,
        *,
        seq_len: int = 64,
        num_sequences: int = 32,
        seed: int = 0,
        bos_token: int | None = None,
        copying: bool = False,
        icl_tokens: Tensor | None = None,
        icl: bool = True,
        icl_early: int | None = None,
        icl_late: int | None = None,
        model_attr: str | None = None,
        weights: bool | str = "auto",
        weight_kinds: tuple[str, ...] = ("Q", "K", "V"),
        attention: Any = "auto",
    ):
        super().__init__()
        if weights not in (True, False, "auto"):
            raise InvalidInputError(f"weights must be True, False or 'auto', got {weights!r}")
        if not set(weight_kinds) <= {"Q", "K", "V"}:
            raise InvalidInputError(f"weight_kinds must be among 'Q', 'K', 'V', got {weight_kinds!r}")
        self.weights, self.weight_kinds = weights, tuple(weight_kinds)
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len),
                            ("num_sequences", num_sequences)):
            if not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise InvalidInputError(
                f"schedule must be a devinterp Schedule (every, log_spaced, at), got {type(schedule).__name__}"
            )
        if icl_tokens is not None and (not isinstance(icl_tokens, Tensor) or icl_tokens.dim() != 2):
            raise InvalidInputError("icl_tokens must be an integer tensor (batch, T)")
        self.vocab_size, self.seq_len, self.num_sequences = vocab_size, seq_len, num_sequences
        self.seed, self.bos_token, self.copying = seed, bos_token, copying
        self.schedule = log_spaced(30) if schedule is None else schedule
        self.icl, self.icl_tokens = icl, icl_tokens
        self.icl_early, self.icl_late = icl_early, icl_late
        self.model_attr = model_attr
        self._gate = StepGate(self.schedule, owner="CircuitCallback")
        self.attention = attention
        self._head_runs: HeadRuns | None = None

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before any callback acts (e.g. the first snapshot): the options must fit the model
        check_scoring_inputs(self._model(pl_module), vocab_size=self.vocab_size, seq_len=self.seq_len,
                             bos_token=self.bos_token)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the shared gate: step 0 of a fresh run, or a resumed due step not yet done
        step = self._gate.start(trainer)
        if step is not None:
            self._score(trainer, pl_module, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._gate.reached(trainer.global_step):
            self._score(trainer, pl_module, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self._gate.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._gate.load_state_dict(state_dict)

    # -- the adapter --------------------------------------------------------------------------
    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"model_attr={self.model_attr!r}: {type(pl_module).__name__} has no such nn.Module attribute"
            )
        return model

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        model = self._model(pl_module)
        with torch.no_grad():  # induction_scores / icl_score restore train/eval flags themselves
            scores = induction_scores(
                model, vocab_size=self.vocab_size, seq_len=self.seq_len,
                num_sequences=self.num_sequences, seed=self.seed, bos_token=self.bos_token,
                device=pl_module.device, copying=self.copying, attention=self.attention,
            )
            values = scores.scalars()
            if self.icl:
                values["icl_score"] = icl_score(
                    model, self.icl_tokens, early=self.icl_early, late=self.icl_late,
                    vocab_size=self.vocab_size, seq_len=self.seq_len,
                    num_sequences=self.num_sequences, seed=self.seed, bos_token=self.bos_token,
                    device=pl_module.device,
                )
            values.update(weight_scalars(model, self.weights, self.weight_kinds))
        log_scalars(trainer, values, step)
        self._log_head_runs(trainer, values, step)

    def _log_head_runs(self, trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        """Every per-head tag again in its head's own TensorBoard run (one colour per head)."""
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        if self._head_runs is None or self._head_runs.logdir != writer.log_dir:
            self._head_runs = HeadRuns(writer.log_dir)
        self._head_runs.add(values, step)
        self._head_runs.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._head_runs is not None:
            self._head_runs.close()
            self._head_runs = None
