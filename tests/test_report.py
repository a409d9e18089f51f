import json
from dataclasses import dataclass

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from devinterp.report import markdown_report, save_summary_png, summary_dict, write_summary_json
from devinterp.tensorboard import (
    custom_scalars_layout,
    llc_band,
    read_scalars,
    read_text,
    write_layout,
)


@dataclass(frozen=True)
class _T:
    step: int
    start: int
    end: int
    direction: str = "rise"
    kind: str = "sigmoid"
    metric: str = "induction/L1H0"


def _curves():
    steps = np.array([0, 1, 3, 10, 30, 100, 300, 1000])
    ind = 1 / (1 + np.exp(-(np.log(steps + 1) - np.log(100)) * 4))
    return {
        "loss/train": (steps, 3 - ind),
        "llc/mean": (steps, 5 + 10 * ind),
        "llc/lower": (steps, 4 + 10 * ind),
        "llc/upper": (steps, 6 + 10 * ind),
        "induction/L1H0": (steps, ind),
        "induction/L1H1": (steps, 0.05 + 0 * ind),
        "previous_token/L0H0": (steps, ind),
    }


def test_summary_png_and_json(tmp_path):
    curves, trs = _curves(), [_T(step=100, start=60, end=200)]
    png = save_summary_png(tmp_path / "summary.png", curves, trs, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(write_summary_json(tmp_path / "s.json", curves, trs).read_text())
    assert data["transitions"][0]["step"] == 100
    assert data["final_head_scores"]["induction"]["L1H0"] == pytest.approx(curves["induction/L1H0"][1][-1])
    assert summary_dict(curves)["final"]["llc/mean"] == pytest.approx(curves["llc/mean"][1][-1])


def test_markdown_orders_heads_and_lists_transitions():
    md = markdown_report(_curves(), [_T(step=100, start=60, end=200)])
    assert "| induction/L1H0 | 100 | 60–200 | rise |" in md
    assert md.index("| L1H0 |") < md.index("| L1H1 |")
    assert "No transition was flagged." in markdown_report(_curves(), [])


def test_layout_and_event_round_trip(tmp_path):
    layout = custom_scalars_layout()["devinterp"]
    assert layout["LLC (mean ± stderr)"][0] == "Margin"
    assert llc_band({"llc/mean": 2.0, "llc/stderr": 0.5}) == {"llc/lower": 1.5, "llc/upper": 2.5}
    w = SummaryWriter(tmp_path)
    write_layout(w)
    for s, v in [(5, 1.0), (1, 2.0), (5, 3.0)]:
        w.add_scalar("icl_score", v, s)
    w.add_text("transitions", "rise at 5", 5)
    w.close()
    steps, values = read_scalars(tmp_path)["icl_score"]
    assert steps.tolist() == [1, 5] and values.tolist() == [2.0, 3.0]
    assert read_text(tmp_path) == [(5, "rise at 5")]
