"""The post-hoc results file: append-only JSON lines, crash-safe, keyed by (analysis, step, config).

One record per line::

    {"analysis": "llc", "step": 100, "config": "3f2a9c0d1e4b", "scalars": {"llc/mean": 12.3, ...},
     "seconds": 4.2, "seed": 123..., "wall_time": 1.7e9, "params": {...analysis config...}}

A record with ``"error"`` instead of ``"scalars"`` notes a failed computation (it does not count as
done). Each line is written whole, flushed and fsynced before the next snapshot is reported done,
so a kill leaves at most one torn last line, which readers ignore and the next writer cuts off.
For a key written twice (``--force``), the later line wins. Non-finite values are written as the
strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no NaN) and read back as floats.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devinterp.errors import ResultsError

__all__ = ["ResultRecord", "ResultsFile", "curves_from_records", "RESULTS_FILE"]

RESULTS_FILE = "results.jsonl"


def _enc(v: float) -> float | str:
    v = float(v)
    return v if math.isfinite(v) else repr(v)


def _dec(v: Any) -> float:
    return float(v)


@dataclass(frozen=True)
class ResultRecord:
    """One analysis of one snapshot.

    Attributes:
        analysis: The analysis name (``"llc"``, ``"circuits"``...).
        step: Training step of the snapshot.
        config: Hash of the analysis configuration (see :func:`~devinterp.posthoc.config_hash`).
        scalars: Tag -> value (empty when ``error`` is set).
        seconds: Compute time of this analysis on this snapshot.
        error: ``"ExceptionType: message"`` if the computation failed, else None.
        meta: The rest of the line (``seed``, ``wall_time``, ``params``, ``rank``...).
    """

    analysis: str
    step: int
    config: str
    scalars: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.analysis, self.step, self.config)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        rec: dict[str, Any] = {"analysis": self.analysis, "step": int(self.step), "config": self.config}
        if self.error is None:
            rec["scalars"] = {k: _enc(v) for k, v in self.scalars.items()}
        else:
            rec["error"] = self.error
        rec["seconds"] = round(float(self.seconds), 6)
        rec.update({k: v for k, v in self.meta.items() if k not in rec})
        rec.setdefault("wall_time", time.time())
        return json.dumps(rec, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResultRecord:
        core = {"analysis", "step", "config", "scalars", "seconds", "error"}
        return cls(
            analysis=str(d["analysis"]),
            step=int(d["step"]),
            config=str(d["config"]),
            scalars={str(k): _dec(v) for k, v in (d.get("scalars") or {}).items()},
            seconds=float(d.get("seconds", 0.0)),
            error=d.get("error"),
            meta={k: v for k, v in d.items() if k not in core},
        )


class ResultsFile:
    """Reader and appender of ``results.jsonl`` (local file).

    Args:
        path: The file (created with its folder on first append).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._repaired = False

    def __repr__(self) -> str:
        return f"ResultsFile({str(self.path)!r})"

    def read(self) -> list[ResultRecord]:
        """Every complete record in file order (a torn last line is skipped).

        Raises:
            ResultsError: A line other than the last is not a valid record (the file was edited
                or damaged): the message names the line.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        out = []
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
                if not isinstance(d, dict) or not {"analysis", "step", "config"} <= set(d):
                    raise ValueError("not a result record")
                out.append(ResultRecord.from_dict(d))
            except (ValueError, TypeError, KeyError) as exc:
                if lineno == len(lines):  # torn final line (no newline after it): never committed
                    continue
                raise ResultsError(
                    f"{self.path} line {lineno} is not a valid result record ({exc}); delete that line "
                    f"(its snapshot is then recomputed) or the whole file to start over"
                ) from exc
        return out

    def latest(self, *, ok_only: bool = True) -> dict[tuple[str, int, str], ResultRecord]:
        """Key -> the last record written for it (failed ones left out with ``ok_only``)."""
        out: dict[tuple[str, int, str], ResultRecord] = {}
        for rec in self.read():
            if ok_only and not rec.ok:
                continue
            out[rec.key] = rec
        return out

    def done_keys(self) -> set[tuple[str, int, str]]:
        """Keys with a successful record: what a new run skips."""
        return set(self.latest(ok_only=True))

    def _repair(self) -> None:
        """Before the first append: cut a torn last line, so the next record starts on its own line."""
        self._repaired = True
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            complete = isinstance(json.loads(data[cut:]), dict)
        except ValueError:
            complete = False
        with open(self.path, "r+b") as f:
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def append(self, records: Iterable[ResultRecord]) -> None:
        """Append records durably: one write of whole lines, then flush and fsync."""
        lines = "".join(r.to_json() + "\n" for r in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._repaired:
            self._repair()
        with open(self.path, "ab") as f:
            f.write(lines.encode())
            f.flush()
            os.fsync(f.fileno())


def curves_from_records(records: Iterable[ResultRecord]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` from records (steps ascending; a later record of a step wins)."""
    series: dict[str, dict[int, float]] = {}
    for rec in records:
        if not rec.ok:
            continue
        for tag, value in rec.scalars.items():
            series.setdefault(tag, {})[rec.step] = float(value)
    out = {}
    for tag, pts in sorted(series.items()):
        steps = np.array(sorted(pts), dtype=np.int64)
        out[tag] = (steps, np.array([pts[s] for s in steps], dtype=float))
    return out
