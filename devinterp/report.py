"""The summary figure and markdown report, shared by ``devinterp demo`` and ``devinterp report``.

Inputs are plain curves ``{tag: (steps, values)}`` (as :func:`devinterp.tensorboard.read_scalars`
returns them) and transitions (any objects with ``step``, ``start``, ``end``, ``direction``,
``kind`` and optionally ``metric``, such as :class:`devinterp.analyses.Transition`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]

_HEAD_PREFIXES = ("induction/", "previous_token/")


def _positive(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop step 0 (and below) so curves can be drawn on a log axis; step 0 is drawn at 0.5."""
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    steps = np.where(steps <= 0, 0.5, steps)
    return steps, values


def summary_figure(curves: Curves, transitions: Sequence = (), *, title: str | None = None):
    """Loss, LLC (with its ``llc/lower``-``llc/upper`` band) and head scores against step (log axis).

    Each transition is shaded over ``[start, end]`` with a line at its ``step`` on every panel.

    Returns:
        A matplotlib ``Figure`` (Agg backend; nothing is shown).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[str]]] = []
    loss_tags = [t for t in curves if t.startswith("loss/")]
    if loss_tags:
        panels.append(("loss", loss_tags))
    if "llc/mean" in curves:
        panels.append(("LLC", ["llc/mean"]))
    head_tags = sorted(t for t in curves if t.startswith("induction/"))
    if head_tags:
        panels.append(("induction score", head_tags))
    prev_tags = sorted(t for t in curves if t.startswith("previous_token/"))
    if prev_tags:
        panels.append(("previous-token score", prev_tags))
    if "icl_score" in curves:
        panels.append(("ICL score", ["icl_score"]))
    if not panels:
        panels.append(("(no curves)", []))

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.3 * len(panels) + 0.6), sharex=True,
                             squeeze=False)
    for ax, (label, tags) in zip(axes[:, 0], panels, strict=True):
        for tag in tags:
            steps, values = _positive(*curves[tag])
            many = len(tags) > 6
            ax.plot(steps, values, marker="" if len(steps) > 60 else ".", lw=1.0 if many else 1.5,
                    alpha=0.8 if many else 1.0, label=tag.split("/", 1)[-1] if tag.startswith(_HEAD_PREFIXES) else tag)
            if tag == "llc/mean" and "llc/lower" in curves and "llc/upper" in curves:
                ls, lo = _positive(*curves["llc/lower"])
                _, hi = _positive(*curves["llc/upper"])
                ax.fill_between(ls, lo, hi, alpha=0.25, lw=0, label="± stderr")
        for tr in transitions:
            ax.axvspan(max(tr.start, 0.5), max(tr.end, 0.5), color="tab:red", alpha=0.12, lw=0)
            ax.axvline(max(tr.step, 0.5), color="tab:red", lw=1.0, ls="--")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.25)
        if tags:
            ax.legend(fontsize=7, ncol=min(4, max(1, math.ceil(len(tags) / 4))), loc="best")
    axes[-1, 0].set_xlabel("training step (log scale)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_summary_png(path: str | Path, curves: Curves, transitions: Sequence = (), *,
                     title: str | None = None) -> Path:
    """Render :func:`summary_figure` to a PNG file and return its path."""
    import matplotlib.pyplot as plt

    fig = summary_figure(curves, transitions, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transition_record(tr) -> dict:
    """A JSON-safe dict of a transition's public fields."""
    fields = ("metric", "step", "start", "end", "direction", "kind", "magnitude", "confidence", "method")
    out = {}
    for f in fields:
        if hasattr(tr, f):
            v = getattr(tr, f)
            out[f] = v.item() if hasattr(v, "item") else v
    return out


def final_values(curves: Curves, prefix: str) -> dict[str, float]:
    """Last value of every curve whose tag starts with ``prefix`` (keyed by the rest of the tag)."""
    return {t[len(prefix):]: float(v[-1]) for t, (s, v) in sorted(curves.items())
            if t.startswith(prefix) and len(v)}


def summary_dict(curves: Curves, transitions: Sequence = ()) -> dict:
    """The content of ``summary.json``: transitions and final head scores (and final LLC/loss)."""
    out = {
        "transitions": [transition_record(t) for t in transitions],
        "final_head_scores": {
            "induction": final_values(curves, "induction/"),
            "previous_token": final_values(curves, "previous_token/"),
        },
    }
    for tag in ("llc/mean", "llc/stderr", "loss/train", "icl_score"):
        if tag in curves and len(curves[tag][1]):
            out.setdefault("final", {})[tag] = float(curves[tag][1][-1])
    return out


def write_summary_json(path: str | Path, curves: Curves, transitions: Sequence = ()) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary_dict(curves, transitions), indent=2))
    return path


def markdown_report(curves: Curves, transitions: Sequence = (), *, title: str = "devinterp report",
                    figure: str | None = "summary.png") -> str:
    """A short markdown report: curves analysed, transitions with evidence, final head scores."""
    lines = [f"# {title}", ""]
    if figure:
        lines += [f"![summary]({figure})", ""]
    lines += ["## Curves", "", "| tag | points | first step | last step | last value |", "|---|---|---|---|---|"]
    for tag, (steps, values) in sorted(curves.items()):
        if len(steps):
            lines.append(f"| `{tag}` | {len(steps)} | {int(steps[0])} | {int(steps[-1])} | {values[-1]:.4g} |")
    lines += ["", "## Transitions", ""]
    if transitions:
        lines += ["| metric | step | range | direction | kind | magnitude | confidence |", "|---|---|---|---|---|---|---|"]
        for tr in transitions:
            r = transition_record(tr)
            mag = r.get("magnitude")
            conf = r.get("confidence")
            lines.append(
                f"| {r.get('metric', '')} | {r['step']} | {r['start']}–{r['end']} | {r.get('direction', '')} | "
                f"{r.get('kind', '')} | {'' if mag is None else f'{mag:.1f}'} | {'' if conf is None else f'{conf:.2f}'} |"
            )
    else:
        lines.append("No transition was flagged.")
    heads = final_values(curves, "induction/")
    if heads:
        prev = final_values(curves, "previous_token/")
        lines += ["", "## Final head scores", "", "| head | induction | previous-token |", "|---|---|---|"]
        for head, score in sorted(heads.items(), key=lambda kv: -kv[1]):
            p = prev.get(head)
            lines.append(f"| {head} | {score:.3f} | {'' if p is None else f'{p:.3f}'} |")
    return "\n".join(lines) + "\n"
