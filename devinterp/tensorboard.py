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
``transitions/marker/<metric>``  the curve's first value at each of its steps, with a spike across
                          its range at each flag of ``<metric>`` (drawn on the curve's own chart;
                          written in step order once the run ends, so lines do not zig-zag)
``transitions`` (text)    one line per flagged transition, with its evidence
========================  =========================================================

Per-head curves (any tag ``<family>/L{l}H{h}`` or ``<family>/L{l}H{h}->L{l'}H{h'}``) are also
written as one TensorBoard *run per head* (``<logdir>/heads/<head>``, tag ``by_head/<family>``),
as ``SummaryWriter.add_scalars`` does, so a chart of a family draws every head in its own colour.
:func:`read_scalars` skips those runs (the main run keeps the ``<family>/<head>`` tags).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

LLC_BAND_TAGS = ("llc/mean", "llc/lower", "llc/upper")
FLAG_TAG = "transitions/flag"
TEXT_TAG = "transitions"
MARKER_PREFIX = "transitions/marker/"
HEADS_DIR = "heads"
BY_HEAD_PREFIX = "by_head/"
#: ``<family>/<head>`` with a head ``L{l}H{h}`` or a pair ``L{l}H{h}->L{l'}H{h'}``.
HEAD_TAG = re.compile(r"^(?P<family>.+)/(?P<head>L\d+H\d+(?:->L\d+H\d+)?)$")


def head_run(tag: str) -> tuple[str, str] | None:
    """``(run, tag)`` under which a per-head tag is also written, or None for other tags.

    ``induction/L1H0`` -> ``("L1H0", "by_head/induction")``;
    ``composition/K/L0H0->L1H1`` -> ``("L0H0-to-L1H1", "by_head/composition/K")``.
    """
    m = HEAD_TAG.match(tag)
    if m is None:
        return None
    return m["head"].replace("->", "-to-"), BY_HEAD_PREFIX + m["family"]


class HeadRuns:
    """One ``SummaryWriter`` per head under ``<logdir>/heads/<head>`` (created on first use).

    Args:
        logdir: The run's TensorBoard folder.
        filename_suffix: Suffix of the event files (lets a writer find and replace its own files).
    """

    def __init__(self, logdir: str | Path, filename_suffix: str = ""):
        self.logdir = str(logdir)
        self.root = Path(logdir) / HEADS_DIR
        self.filename_suffix = filename_suffix
        self._writers: dict = {}

    def add(self, scalars: Mapping[str, float], step: int) -> int:
        """Write every per-head tag of ``scalars`` to its head's run; returns how many were."""
        count = 0
        for tag, value in scalars.items():
            where = head_run(tag)
            if where is None:
                continue
            run, family_tag = where
            writer = self._writers.get(run)
            if writer is None:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.root / run), filename_suffix=self.filename_suffix)
                self._writers[run] = writer
            writer.add_scalar(family_tag, float(value), int(step))
            count += 1
        return count

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def marker_points(step: float, values: Sequence[float]) -> list[tuple[int, float]]:
    """A visible marker for a flag at ``step`` on a curve with ``values`` (its points so far, in
    step order): a spike from the curve's first value (one step before and after ``step``) to the
    value farthest from it (at ``step``), i.e. across the curve's whole range so far.

    The base is the same for every marker of a curve (its first value does not change as the curve
    grows), so the line between two markers runs flat along it, even when a later flag is at an
    earlier step: no zig-zag. The spike points up on a rising curve (scores, LLC) and down on a
    falling one (loss).
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    base, top = (float(v[0]), float(v[np.argmax(np.abs(v - v[0]))])) if v.size else (0.0, 1.0)
    if top == base:
        top = base + (abs(base) or 1.0)
    s = int(round(float(step)))
    return [(max(s - 1, 0), base), (s, top), (s + 1, base)]


def marker_series(steps: Sequence[float], values: Sequence[float],
                  flagged: Sequence[float]) -> list[tuple[int, float]]:
    """A curve's whole marker series, in step order: the curve's first value at each of its steps
    and the value farthest from it at each flagged step and the steps either side (a spike across
    the range).

    Written once, densely and in step order, this draws a flat line with one vertical spike per
    flag, also under TensorBoard's smoothing (sparse or out-of-order points are joined by
    diagonal lines, which smoothing bends further).
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v) & np.isfinite(s)
    s, v = s[ok], v[ok]
    if not v.size:
        return []
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    base = float(v[0])
    top = float(v[np.argmax(np.abs(v - base))])
    if top == base:
        top = base + (abs(base) or 1.0)
    points = {int(round(x)): base for x in s.tolist()}
    for f in flagged:  # three steps wide, so the spike survives TensorBoard's smoothing
        c = int(round(float(f)))
        for k in (c - 1, c, c + 1):
            if k >= 0:
                points[k] = top
    return sorted(points.items())


def log_markers(writer, metric: str, steps: Sequence[float], values: Sequence[float],
                flagged: Sequence[float]) -> None:
    """Write ``metric``'s :func:`marker_series` under ``transitions/marker/<metric>`` (once, after
    its last flag: at the end of training, or post hoc)."""
    for s, v in marker_series(steps, values, flagged):
        writer.add_scalar(MARKER_PREFIX + metric, v, s)


def log_flag(writer, transition, values: Sequence[float]) -> None:
    """Write ``transition``'s marker (:func:`marker_points`) under ``transitions/marker/<metric>``."""
    metric = getattr(transition, "metric", None) or "unnamed"
    for s, v in marker_points(transition.step, values):
        writer.add_scalar(MARKER_PREFIX + metric, v, s)


def llc_band(scalars: Mapping[str, float]) -> dict[str, float]:
    """``llc/lower`` and ``llc/upper`` (mean -/+ stderr) for the margin chart, from LLC scalars."""
    mean = scalars.get("llc/mean")
    err = scalars.get("llc/stderr", scalars.get("llc/std"))
    if mean is None or err is None:
        return {}
    return {"llc/lower": float(mean) - float(err), "llc/upper": float(mean) + float(err)}


def custom_scalars_layout() -> dict:
    """The devinterp custom-scalars layout (Multiline entries are regular expressions over tags,
    searched, so they are anchored here).

    - *LLC*: a margin chart of ``llc/mean`` with its ``mean -/+ stderr`` band, and the LLC with its
      transition markers;
    - *Circuits*: every head's induction score on one chart, every previous-token score on another,
      one run (one colour) per head, with the heads' transition markers;
    - *Loss*, *ICL score*: each curve with its own transition markers (spikes over its range);
    - *Transition flags*: ``transitions/flag`` (1 at every flagged step, any metric).
    """
    def marked(tag: str) -> list[str]:
        return [f"^{re.escape(tag)}$", f"^{re.escape(MARKER_PREFIX + tag)}$"]

    return {
        "devinterp": {
            "LLC (mean ± stderr)": ["Margin", list(LLC_BAND_TAGS)],
            "LLC with transition markers": ["Multiline", marked("llc/mean")],
            "Induction score, one run per head": [
                "Multiline", [r"^by_head/induction$", rf"^{MARKER_PREFIX}induction/"]],
            "Previous-token score, one run per head": [
                "Multiline", [r"^by_head/previous_token$", rf"^{MARKER_PREFIX}previous_token/"]],
            "Loss with transition markers": ["Multiline", marked("loss/train")],
            "In-context-learning score with transition markers": ["Multiline", marked("icl_score")],
            "Transition flags (1 at each flagged step)": ["Multiline", [f"^{FLAG_TAG}$"]],
            "K-composition, one run per head pair": [
                "Multiline", [r"^by_head/composition/K$", rf"^{MARKER_PREFIX}composition/K/"]],
            "OV copying, one run per head": [
                "Multiline", [r"^by_head/ov_copying$", rf"^{MARKER_PREFIX}ov_copying/"]],
        }
    }


def write_layout(writer) -> None:
    """Write :func:`custom_scalars_layout` with a ``SummaryWriter`` (once per writer)."""
    writer.add_custom_scalars(custom_scalars_layout())


def read_scalars(logdir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every scalar series under ``logdir`` (all runs merged, last write of a step wins).

    Per-head runs (under ``heads/``) are skipped: their curves are the main run's
    ``<family>/<head>`` tags.

    Returns:
        ``{tag: (steps, values)}`` with steps sorted ascending.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        if HEADS_DIR in events.relative_to(logdir).parts[:-1]:
            continue  # per-head runs repeat the main run's <family>/<head> tags
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
