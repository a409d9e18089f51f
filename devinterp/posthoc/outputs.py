"""What a post-hoc run leaves next to its results: tables, transitions and TensorBoard events.

All of it is derived from ``results.jsonl`` (the source of truth) and rewritten by every run, so it
never disagrees with the results: ``results.csv`` / ``results.json`` (one row per step, one column
per tag), ``transitions.json``, and TensorBoard events under the TensorBoard folder (old event
files this store's runs wrote there are replaced).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from devinterp.report import transition_record
from devinterp.tensorboard import HEADS_DIR, HeadRuns, llc_band, log_markers, write_layout

__all__ = [
    "Curves",
    "with_band",
    "write_tables",
    "run_transitions",
    "write_transitions",
    "read_transitions",
    "TensorBoardOut",
    "DEFAULT_TRANSITION_METRICS",
]

Curves = dict[str, tuple[np.ndarray, np.ndarray]]

#: Curves searched for transitions by default (those present with enough points).
DEFAULT_TRANSITION_METRICS = ("llc/mean", "loss/train", "induction/max", "previous_token/max", "icl_score",
                              "composition/K/max")
#: A curve needs at least this many points to be searched for transitions.
MIN_TRANSITION_POINTS = 8

#: Files a run writes into its results folder besides ``results.jsonl`` (replaced by every run).
OWN_FILES = ("results.csv", "results.json", "transitions.json")

FLAG_TAG = "transitions/flag"
TEXT_TAG = "transitions"


def with_band(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Curves:
    """``curves`` plus ``llc/lower`` / ``llc/upper`` (mean -/+ stderr) where the LLC is present."""
    out = dict(curves)
    if "llc/mean" in curves and ("llc/stderr" in curves or "llc/std" in curves):
        steps, mean = curves["llc/mean"]
        err_steps, err = curves.get("llc/stderr", curves.get("llc/std"))
        lookup = dict(zip(err_steps.tolist(), err.tolist(), strict=True))
        keep = [i for i, s in enumerate(steps.tolist()) if s in lookup]
        s = steps[keep]
        band = [llc_band({"llc/mean": float(mean[i]), "llc/stderr": lookup[int(steps[i])]}) for i in keep]
        out["llc/lower"] = (s, np.array([b["llc/lower"] for b in band], dtype=float))
        out["llc/upper"] = (s, np.array([b["llc/upper"] for b in band], dtype=float))
    return out


def _cell(v: float) -> str:
    return repr(float(v)) if math.isfinite(v) else str(v)


def write_tables(out_dir: str | Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.json``: one row per step, one column per tag (blank if absent)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = sorted(curves)
    rows: dict[int, dict[str, float]] = {}
    for tag in tags:
        for s, v in zip(*curves[tag], strict=True):
            rows.setdefault(int(s), {})[tag] = float(v)
    csv_path = out_dir / "results.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *tags])
        for step in sorted(rows):
            w.writerow([step, *(_cell(rows[step][t]) if t in rows[step] else "" for t in tags)])
    os.replace(tmp, csv_path)
    json_path = out_dir / "results.json"
    table = [{"step": step, **{t: (v if math.isfinite(v) else repr(v)) for t, v in sorted(rows[step].items())}}
             for step in sorted(rows)]
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"columns": ["step", *tags], "rows": table}, indent=1))
    os.replace(tmp, json_path)
    return csv_path, json_path


def run_transitions(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    metrics: Sequence[str] | None = None, **detector_kwargs: Any) -> list:
    """:func:`devinterp.analyses.detect_transitions` on each named curve with enough points.

    The LLC curve uses ``llc/stderr`` as per-point errors. Curves that are missing, too short or
    that the detector rejects are skipped. Returns the transitions of all curves, by step.
    """
    from devinterp.analyses import detect_transitions
    from devinterp.errors import InvalidInputError

    found = []
    for metric in metrics or DEFAULT_TRANSITION_METRICS:
        if metric not in curves:
            continue
        steps, values = curves[metric]
        ok = np.isfinite(values)
        steps, values = steps[ok], values[ok]
        if len(steps) < MIN_TRANSITION_POINTS:
            continue
        kwargs = dict(detector_kwargs)
        if metric == "llc/mean" and "llc/stderr" in curves:
            es, ev = curves["llc/stderr"]
            lookup = dict(zip(es.tolist(), ev.tolist(), strict=True))
            err = np.array([lookup.get(int(s), np.nan) for s in steps])
            if np.all(np.isfinite(err)) and np.all(err > 0):
                kwargs["stderr"] = err
        try:
            found.extend(detect_transitions(steps, values, metric=metric, **kwargs))
        except InvalidInputError:
            continue
    return sorted(found, key=lambda t: (t.step, getattr(t, "metric", "") or ""))


def write_transitions(out_dir: str | Path, transitions: Sequence) -> Path:
    path = Path(out_dir) / "transitions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([transition_record(t) for t in transitions], indent=1, default=float))
    os.replace(tmp, path)
    return path


class _TransitionView:
    """A transition read back from ``transitions.json`` (the attributes :mod:`devinterp.report` uses)."""

    def __init__(self, record: Mapping[str, Any]):
        self.__dict__.update(record)
        for f in ("step", "start", "end"):
            setattr(self, f, float(record.get(f, 0.0)))

    def __repr__(self) -> str:
        return f"Transition({self.__dict__})"


def read_transitions(out_dir: str | Path) -> list | None:
    """Transitions saved by the last run (objects with ``step``, ``start``, ``end``...), or None."""
    path = Path(out_dir) / "transitions.json"
    if not path.exists():
        return None
    return [_TransitionView(r) for r in json.loads(path.read_text())]


def _describe(t: Any) -> str:
    describe = getattr(t, "describe", None)
    if callable(describe):
        return str(describe())
    r = transition_record(t)
    return ", ".join(f"{k}={v}" for k, v in r.items())


class TensorBoardOut:
    """TensorBoard events of one store's post-hoc analysis, written by rank zero.

    Opening removes the event files that earlier runs for the same store wrote in ``logdir``
    (recognised by their file-name suffix, which carries a hash of the store's path), so the
    folder always shows exactly the results file's curves; other files are left alone.
    """

    def __init__(self, logdir: str | Path, store_root: str):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(store_root.encode()).hexdigest()[:8]
        suffix = f".devinterp-posthoc-{tag}"
        for old in self.logdir.glob(f"events.out.tfevents.*{suffix}"):
            old.unlink()
        for old in self.logdir.glob(f"{HEADS_DIR}/*/events.out.tfevents.*{suffix}"):
            old.unlink()
        self.writer = SummaryWriter(str(self.logdir), filename_suffix=suffix)
        self.heads = HeadRuns(self.logdir, filename_suffix=suffix)  # one run per head
        self._curves: dict[str, list[float]] = {}
        self._curve_steps: dict[str, list[int]] = {}
        write_layout(self.writer)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        values = dict(values)
        values.update(llc_band(values))
        for tag, v in sorted(values.items()):
            self.writer.add_scalar(tag, float(v), int(step))
            self._curves.setdefault(tag, []).append(float(v))
            self._curve_steps.setdefault(tag, []).append(int(step))
        self.heads.add(values, int(step))

    def curves(self, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        for tag, (steps, values) in sorted(curves.items()):
            for s, v in zip(steps.tolist(), values.tolist(), strict=True):
                self.writer.add_scalar(tag, float(v), int(s))
                self.heads.add({tag: float(v)}, int(s))
            self._curves[tag] = [float(v) for v in values.tolist()]
            self._curve_steps[tag] = [int(s) for s in steps.tolist()]

    def transitions(self, transitions: Sequence) -> None:
        flagged: dict[str, list[float]] = {}
        for t in transitions:
            step = int(round(float(t.step)))
            self.writer.add_scalar(FLAG_TAG, 1.0, step)
            self.writer.add_text(TEXT_TAG, _describe(t), step)
            metric = getattr(t, "metric", None)
            if metric in self._curves:
                flagged.setdefault(metric, []).append(float(t.step))
        for metric, steps in flagged.items():  # flat, a spike across the range at each flag
            log_markers(self.writer, metric, self._curve_steps[metric], self._curves[metric], steps)

    def flush(self) -> None:
        self.writer.flush()
        self.heads.flush()

    def close(self) -> None:
        self.writer.close()
        self.heads.close()
