"""TensorBoard conventions shared by the online callbacks and post-hoc analysis.

One tag vocabulary (below), one custom-scalars layout, and a reader that turns an event directory
back into curves. The tags:

========================  =========================================================
``loss/train``            training loss
``llc/mean``              LLC estimate (mean over chains)
``llc/std``, ``llc/stderr``  spread across chains; standard error (autocorrelation-aware)
``llc/lower``, ``llc/upper``  ``mean -/+ stderr``: the band of the margin chart
``induction/L{l}H{h}``    induction (prefix-matching) score of each head
``previous_token/L{l}H{h}``  previous-token score of each head
``icl_score``             in-context-learning score (late minus early token loss)
``composition/{Q,K,V}/L0H0->L1H1``  weight-space composition score of a head pair (and ``/max``, ``/baseline``)
``ov_copying/L{l}H{h}``   copying score of the head's OV circuit (eigenvalues)
``qk_previous_token/L{l}H{h}``  previous-token attention of the positional QK circuit
``transitions/flag``      1 at each flagged transition step
``transitions`` (text)    one line per flagged transition, with its evidence
========================  =========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

LLC_BAND_TAGS = ("llc/mean", "llc/lower", "llc/upper")


def llc_band(scalars: Mapping[str, float]) -> dict[str, float]:
    """``llc/lower`` and ``llc/upper`` (mean -/+ stderr) for the margin chart, from LLC scalars."""
    mean = scalars.get("llc/mean")
    err = scalars.get("llc/stderr", scalars.get("llc/std"))
    if mean is None or err is None:
        return {}
    return {"llc/lower": float(mean) - float(err), "llc/upper": float(mean) + float(err)}


def custom_scalars_layout() -> dict:
    """The devinterp custom-scalars layout (Multiline entries are regular expressions over tags).

    - *LLC*: a margin chart of ``llc/mean`` with its ``mean -/+ stderr`` band;
    - *Circuits*: every head's induction score on one chart, every previous-token score on another;
    - *Loss and transitions*: ``loss/train`` with the ``transitions/flag`` markers.
    """
    return {
        "devinterp": {
            "LLC (mean ± stderr)": ["Margin", list(LLC_BAND_TAGS)],
            "Induction score, all heads": ["Multiline", [r"induction/.*"]],
            "Previous-token score, all heads": ["Multiline", [r"previous_token/.*"]],
            "Loss with transition markers": ["Multiline", [r"loss/train", r"transitions/flag"]],
            "In-context-learning score": ["Multiline", [r"icl_score"]],
            "K-composition, all head pairs": ["Multiline", [r"composition/K/.*"]],
            "OV copying, all heads": ["Multiline", [r"ov_copying/.*"]],
        }
    }


def write_layout(writer) -> None:
    """Write :func:`custom_scalars_layout` with a ``SummaryWriter`` (once per writer)."""
    writer.add_custom_scalars(custom_scalars_layout())


def read_scalars(logdir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every scalar series under ``logdir`` (all runs merged, last write of a step wins).

    Returns:
        ``{tag: (steps, values)}`` with steps sorted ascending.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = merged.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                series[int(ev.step)] = float(ev.value)
    out = {}
    for tag, series in merged.items():
        steps = np.array(sorted(series), dtype=np.int64)
        out[tag] = (steps, np.array([series[s] for s in steps], dtype=float))
    return out


def read_text(logdir: str | Path, tag: str = "transitions") -> list[tuple[int, str]]:
    """Read the text summaries written under ``tag`` (as ``(step, text)``, in step order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: list[tuple[int, str]] = []
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        for t in acc.Tags().get("tensors", []):
            if t == tag or t.startswith(f"{tag}/text_summary"):
                for ev in acc.Tensors(t):
                    raw = ev.tensor_proto.string_val
                    out.extend((int(ev.step), v.decode("utf-8")) for v in raw)
    return sorted(out, key=lambda x: x[0])
