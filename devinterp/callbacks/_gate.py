"""The scheduled-step gate every devinterp callback uses to decide *when* to act.

One rule for :class:`~devinterp.callbacks.SnapshotCallback`, :class:`~devinterp.callbacks.CircuitCallback`
and :class:`~devinterp.callbacks.LLCCallback`:

- the schedule is resolved when training starts (``on_train_start``: a resumed run's
  ``global_step`` is restored by then), with the run's total steps;
- a run that starts from scratch acts at step 0 (when ``initial``);
- a run resumed at step ``S`` acts at ``S`` only if ``S`` is due and the checkpoint's state does not
  record it as done (the interrupted run died between the checkpoint and acting), so nothing is
  done twice and nothing scheduled is skipped;
- after an optimizer step (``global_step`` advanced: gradient accumulation is handled), it acts
  when the new step is due, once per step.

The gate marks a step done when it says "act"; its state (``{"last_step": S}``) goes into the
callback's checkpoint state.
"""

from __future__ import annotations

from typing import Any

from devinterp.callbacks._trainer import total_steps
from devinterp.errors import ScheduleError
from devinterp.schedules import Schedule, at

__all__ = ["StepGate"]


class StepGate:
    """Decides at which training steps a callback acts.

    Args:
        schedule: The (possibly unresolved) schedule, in ``trainer.global_step`` units.
        owner: The callback's name, for error messages.
        initial: Act at step 0 when training starts from scratch.
    """

    def __init__(self, schedule: Schedule, *, owner: str, initial: bool = True):
        if not isinstance(schedule, Schedule):
            raise ScheduleError(f"{owner}: schedule must be a devinterp.schedules.Schedule, "
                                f"got {type(schedule).__name__}")
        self.schedule = schedule
        self.owner = owner
        self.initial = bool(initial)
        self.resolved: Schedule | None = None
        self.total: int | None = None
        self.last_step: int | None = None
        self._due: frozenset[int] | None = None

    # ---- training start -------------------------------------------------------------------

    def resolve(self, trainer: Any) -> Schedule:
        """Resolve the schedule against the trainer's total steps (done by :meth:`start`)."""
        self.total = total_steps(trainer)
        try:
            self.resolved = self.schedule.resolve(self.total)
        except ScheduleError as exc:
            raise ScheduleError(f"{self.owner}: {exc}") from exc
        try:  # a set lookup per batch when the steps can be listed
            self._due = frozenset(self.resolved.steps(self.total)) if self.total is not None else None
        except ScheduleError:
            self._due = None
        return self.resolved

    def start(self, trainer: Any) -> int | None:
        """Resolve the schedule; the step to act on right now (0, or a resumed due step), else None."""
        self.resolve(trainer)
        step = int(trainer.global_step)
        if step == 0:
            act = self.initial and self.last_step is None
        else:
            act = self.is_due(step) and self.last_step != step
        if act:
            self.last_step = step
            return step
        return None

    # ---- during training ------------------------------------------------------------------

    def reached(self, step: int) -> bool:
        """At batch end: whether ``step`` is a new, due step (then it is marked done)."""
        if step == self.last_step or self.resolved is None or not self.is_due(step):
            return False
        self.last_step = step
        return True

    def is_due(self, step: int) -> bool:
        """Whether ``step`` is scheduled (after :meth:`start`)."""
        if self._due is not None:
            return step in self._due
        if self.resolved is None:
            raise ScheduleError(f"{self.owner}: the schedule is resolved when training starts; no fit has started")
        return self.resolved.is_due(step)

    def planned_steps(self) -> list[int]:
        """Every step this run acts at (step 0 included when ``initial``); needs a known total."""
        if self.resolved is None:
            raise ScheduleError(f"{self.owner}: the schedule is resolved when training starts")
        sched = self.resolved | at([0]) if self.initial else self.resolved
        return sched.steps(self.total)

    # ---- checkpoint state -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last = state.get("last_step")
        self.last_step = int(last) if last is not None else None
