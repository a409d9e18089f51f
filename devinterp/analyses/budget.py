"""Counting model evaluations against a budget, with a progress bar and announcements on stderr.

The cost of an LLC estimate is counted in *model evaluations*: one forward (and backward) pass of
the model on one minibatch for one chain. An SGLD step of C chains costs C; a MALA acceptance check
C more; the full-data loss ``L_n(w*)`` one per evaluation chunk; a Hessian-vector product of the
curvature probe two per start. A :class:`Meter` adds them up for one ``estimate_llc`` or
``calibrate`` call, knows the budget and drives one ``tqdm`` bar (stderr, shown only after
:data:`BAR_DELAY` seconds, so quick estimates print nothing).

``progress=None`` (the default everywhere) means: on when stderr is a terminal.
"""

from __future__ import annotations

import math
import sys
from typing import Any

#: Model evaluations one ``estimate_llc`` call (calibration, L(w*), chains, checks) may cost by
#: default; ``budget=`` raises or lowers it, ``budget=None`` lifts it.
DEFAULT_BUDGET = 5000
#: The bar appears only when the work has run this many seconds (short work prints nothing).
BAR_DELAY = 2.0


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` itself when given, else whether stderr is a terminal."""
    if progress is not None:
        return bool(progress)
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def check_budget(budget: Any) -> int | None:
    """Validate a ``budget=`` argument (a positive int or None) and return it."""
    from devinterp.errors import InvalidInputError

    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise InvalidInputError(f"budget must be a positive int (model evaluations) or None for "
                                f"no limit, got {budget!r}")
    return int(budget)


class Meter:
    """Model evaluations spent so far, the budget, and the progress bar over them.

    Args:
        budget: the most evaluations the work may cost (None: no limit).
        progress: show the bar and the announcements (None: when stderr is a terminal).
        desc: the bar's label.
        total: the bar's length when there is no budget (evaluations planned); updated with
            :meth:`plan`.
    """

    def __init__(self, budget: int | None, *, progress: bool | None = None, desc: str = "LLC",
                 total: int | None = None):
        self.budget = budget
        self.used = 0
        self.enabled = progress_enabled(progress)
        self.desc = desc
        self._bar: Any = None
        self._total = total if total is not None else budget

    # ---- accounting ------------------------------------------------------------------------
    def remaining(self) -> float:
        """Evaluations left in the budget (``inf`` without one)."""
        return math.inf if self.budget is None else max(self.budget - self.used, 0)

    def add(self, evaluations: int) -> None:
        """Count ``evaluations`` model evaluations (and advance the bar)."""
        self.used += int(evaluations)
        if self._bar is not None:
            self._bar.update(int(evaluations))

    def plan(self, total: int) -> None:
        """Set the bar's length to ``total`` evaluations (the whole call, spent ones included)."""
        self._total = max(int(total), self.used)
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    # ---- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Announce ``text`` on stderr (when progress is on), above the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self) -> None:
        """Open the bar (it shows itself after :data:`BAR_DELAY` seconds)."""
        if not self.enabled or self._bar is not None:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self._total, initial=self.used, desc=self.desc, unit="eval",
                         file=sys.stderr, delay=BAR_DELAY, dynamic_ncols=True, leave=False,
                         mininterval=0.5, smoothing=0.1)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Meter:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def chain_cost(num_chains: int, num_burnin: int, num_draws: int, checks: int = 0) -> int:
    """Model evaluations of ``num_chains`` chains of ``num_burnin + num_draws`` steps with
    ``checks`` MALA acceptance checks each."""
    return int(num_chains) * (int(num_burnin) + int(num_draws) + int(checks))


def fit_lengths(num_chains: int, num_burnin: int, num_draws: int, available: float, *,
                min_chains: int = 2, min_draws: int = 20,
                check_fraction: float = 1 / 30) -> tuple[int, int, int]:
    """Chains, burn-in and draws that cost at most ``available`` model evaluations.

    Nothing changes when the lengths fit. Otherwise the burn-in is kept (cutting it biases λ̂
    downwards, the chains still rising) and chains are dropped (down to ``min_chains``) while
    that buys draws: every chain pays the burn-in again, so with a long burn-in fewer, longer
    chains give more draws for the same evaluations. The draws then fill what is left. Only when
    even ``min_chains`` chains cannot afford the burn-in plus ``min_draws`` is the burn-in cut,
    to two thirds of each chain.

    Args:
        num_chains, num_burnin, num_draws: the wanted lengths.
        available: model evaluations left (``inf``: no limit).
        min_chains: fewest chains to keep (split R-hat needs two).
        min_draws: fewest draws per chain.
        check_fraction: MALA acceptance checks per draw (each one more evaluation per chain).

    Returns:
        ``(num_chains, num_burnin, num_draws)``.
    """
    def cost(c: int, b: int, d: int) -> float:
        return c * (b + d * (1 + check_fraction))

    if not math.isfinite(available) or cost(num_chains, num_burnin, num_draws) <= available:
        return num_chains, num_burnin, num_draws
    low = min(min_chains, num_chains)
    best = None
    for c in range(num_chains, low - 1, -1):
        d = int((available / c - num_burnin) / (1 + check_fraction))
        if d >= min_draws:
            d = min(d, num_draws)
            if best is None or c * d > best[0] * best[2] * 1.25:  # more draws in all, clearly
                best = (c, num_burnin, d)
    if best is not None:
        return best
    c = low
    per_chain = max(int(available / c), 3)
    b = min(num_burnin, int(per_chain * 2 / 3))
    d = max(int((per_chain - b) / (1 + check_fraction)), 1)
    return c, b, d
