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

_HEAD_PREFIXES = ("induction/", "previous_token/", "composition/K/", "ov_copying/")
#: How many K-composition pairs the summary figure draws (the strongest at the end of the run).
TOP_PAIRS = 4


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
    pairs = strongest_pairs(curves, "K", TOP_PAIRS)
    if pairs:
        panels.append(("K-composition\n(strongest pairs)", pairs))
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
        base = "composition/K/baseline"
        if tags and tags[0].startswith("composition/K/") and base in curves and len(curves[base][1]):
            ax.axhline(float(curves[base][1][-1]), color="0.4", lw=1.0, ls=":", label="random baseline")
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


def strongest_pairs(curves: Curves, kind: str = "K", top: int = TOP_PAIRS) -> list[str]:
    """Tags ``composition/{kind}/A->B`` of the ``top`` pairs with the highest final score."""
    prefix = f"composition/{kind}/"
    finals = {t: float(v[-1]) for t, (_, v) in curves.items()
              if t.startswith(prefix) and "->" in t and len(v) and np.isfinite(v[-1])}
    return sorted(finals, key=lambda t: -finals[t])[:top]


def _rise_step(steps: np.ndarray, values: np.ndarray) -> float | None:
    """First step where ``values`` is half-way from its first to its last value."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    if len(values) < 2 or not (np.isfinite(values[0]) and np.isfinite(values[-1])) or values[-1] <= values[0]:
        return None
    hit = np.nonzero(values >= (values[0] + values[-1]) / 2)[0]
    return float(steps[hit[0]]) if len(hit) else None


def induction_circuits(curves: Curves, transitions: Sequence = (), *, threshold: float = 0.5) -> list[dict]:
    """The induction circuits visible in the curves: previous-token head → induction head.

    For each head whose final ``induction/`` score exceeds ``threshold``, the earlier-layer head
    with the highest final ``previous_token/`` score is its partner; the K-composition of the pair
    (``composition/K/prev->ind``) is reported from its first to its last value, with the step of
    the transition flagged on that curve (the one closest to its half-way rise) or, if none was
    flagged, the half-way step itself.

    "Rises with the circuit" is measured at the end of formation, ``formation_end`` = 1.5 × the
    first step where the induction score reaches half its final value: ``rise_by_formation`` is
    the pair's K-composition there minus its first value, and ``other_rises_by_formation`` the
    same for every other K pair into the induction head (``{"L0H1": 0.006, ...}``).

    Returns:
        ``[{"previous_token": "L0H0", "induction": "L1H1", "k_composition": (first, last),
        "step": ..., "flagged": bool, "baseline": ..., "formation_end": ..., "rise_by_formation":
        ..., "other_rises_by_formation": {...}}, ...]`` (empty without the curves).
    """
    def layer(head: str) -> int:
        return int(head[1:].split("H")[0])

    ind = {h: v for h, v in final_values(curves, "induction/").items() if h != "max" and v > threshold}
    prev = {h: v for h, v in final_values(curves, "previous_token/").items() if h != "max"}
    base = curves.get("composition/K/baseline")
    out = []
    for head in sorted(ind, key=lambda h: -ind[h]):
        earlier = {h: v for h, v in prev.items() if layer(h) < layer(head)}
        if not earlier:
            continue
        src = max(earlier, key=earlier.get)
        tag = f"composition/K/{src}->{head}"
        if tag not in curves or not len(curves[tag][1]):
            continue
        steps, values = curves[tag]
        half = _rise_step(steps, values)
        flags = [float(t.step) for t in transitions if getattr(t, "metric", None) == tag
                 and getattr(t, "direction", "rise") == "rise"]
        step, flagged = half, False
        if flags:
            ref = half if half is not None else float(steps[-1])
            step, flagged = min(flags, key=lambda s: abs(math.log(max(s, 0.5) / max(ref, 0.5)))), True
        end = _formation_end(*curves[f"induction/{head}"])
        others = {t.split("/")[-1].split("->")[0]: curves[t] for t in curves
                  if t.startswith("composition/K/") and t.endswith(f"->{head}") and t != tag}
        out.append({"previous_token": src, "induction": head,
                    "k_composition": (float(values[0]), float(values[-1])), "step": step,
                    "flagged": flagged,
                    "baseline": None if base is None or not len(base[1]) else float(base[1][-1]),
                    "formation_end": end, "rise_by_formation": _rise_until(steps, values, end),
                    "other_rises_by_formation": {h: _rise_until(*c, end) for h, c in sorted(others.items())}})
    return out


def _formation_end(steps: np.ndarray, values: np.ndarray) -> float | None:
    """1.5 × the first step where ``values`` reaches half its final value (None if it never does)."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    if not len(values) or not np.isfinite(values[-1]) or values[-1] <= 0:
        return None
    hit = np.nonzero(values >= values[-1] / 2)[0]
    return 1.5 * float(steps[hit[0]]) if len(hit) else None


def _rise_until(steps: np.ndarray, values: np.ndarray, step: float | None) -> float | None:
    """``values`` at the last point at or before ``step``, minus its first value."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    if step is None or not len(values):
        return None
    i = int(np.searchsorted(steps, step, side="right")) - 1
    return float(values[max(i, 0)] - values[0])


def describe_circuit(c: Mapping) -> str:
    """``"L0H0 (previous token) → L1H1 (induction), K-composition 0.13 → 0.21 at step ~150"``."""
    a, b = c["k_composition"]
    when = "" if c["step"] is None else f" at step ~{c['step']:.0f}" + ("" if c["flagged"] else " (not flagged)")
    base = "" if c.get("baseline") is None else f" (random baseline {c['baseline']:.2f})"
    return (f"{c['previous_token']} (previous token) → {c['induction']} (induction), "
            f"K-composition {a:.2f} → {b:.2f}{when}{base}")


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
    copying = {h: v for h, v in final_values(curves, "ov_copying/").items()}
    if copying:
        out["final_head_scores"]["ov_copying"] = copying
    pairs = strongest_pairs(curves, "K", TOP_PAIRS)
    if pairs:
        out["strongest_k_composition"] = {t.split("/", 2)[2]: float(curves[t][1][-1]) for t in pairs}
    circuits = induction_circuits(curves, transitions)
    if circuits:
        out["circuits"] = [dict(c, text=describe_circuit(c)) for c in circuits]
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
    circuits = induction_circuits(curves, transitions)
    if circuits:
        lines += ["", "## Circuits (from the weights)", ""]
        lines += [f"- {describe_circuit(c)}" for c in circuits]
    return "\n".join(lines) + "\n"
