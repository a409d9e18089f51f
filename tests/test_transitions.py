import functools
import math

import numpy as np
import pytest
from scipy.special import expit

from devinterp.analyses import Transition, detect_stages, detect_transitions
from devinterp.analyses.synthetic import curve_suite, score, synthetic_curve
from devinterp.analyses.transitions import llc_stages
from devinterp.errors import InvalidInputError


def _curve(seed=0, n=200, mid=1000.0, width=0.1, amp=8.0, drift=10.0, df=None):
    rng = np.random.default_rng(seed)
    steps = np.unique(np.round(np.geomspace(10, 1e5, n)))
    x = np.log(steps + 1)
    noise = rng.standard_normal(steps.size) if df is None else rng.standard_t(df, steps.size)
    y = drift * (x - x[0]) / (x[-1] - x[0]) + amp * expit((x - math.log(mid + 1)) / width) + noise
    return steps, y


def test_finds_one_sigmoid_with_step_units_and_evidence():
    steps, y = _curve()
    (t,) = detect_transitions(steps, y)
    assert isinstance(t, Transition)
    assert abs(math.log(t.step / 1000.0)) < math.log(1.2)
    assert t.start < t.step < t.end and t.direction == "rise"
    assert float(t.step).is_integer()  # integer steps in, integer step out
    assert 5 < t.magnitude < 12 and t.confidence > 0.99 and t.evidence > t.penalty


def test_fall_is_fall_and_scale_invariant():
    steps, y = _curve(amp=-9.0)
    a = detect_transitions(steps, y)
    b = detect_transitions(steps, 1e-3 * y + 7.0)
    assert [t.direction for t in a] == ["fall"]
    assert a[0].step == b[0].step and a[0].magnitude == pytest.approx(b[0].magnitude, rel=1e-6)


def test_unsorted_input_is_sorted_and_same_seed_same_result():
    steps, y = _curve(seed=3)
    perm = np.random.default_rng(1).permutation(steps.size)
    assert detect_transitions(steps[perm], y[perm]) == detect_transitions(steps, y)


def test_pure_drift_and_heavy_tails_give_no_flag():
    for seed in range(5):
        steps, y = _curve(seed=seed, amp=0.0, drift=30.0, df=3)
        assert detect_transitions(steps, y) == []


def test_stderr_is_used():
    steps, y = _curve(seed=2, amp=6.0)
    stderr = np.ones(steps.size)
    stderr[steps > 3000] = 10.0  # late points very uncertain: the scale follows stderr
    y = y + np.where(steps > 3000, np.random.default_rng(5).normal(0, 10, steps.size), 0.0)
    found = detect_transitions(steps, y, stderr=stderr)
    assert len(found) == 1 and abs(math.log(found[0].step / 1000)) < math.log(1.3)


def test_induction_like_sharp_rise_with_few_points():
    # score rises from ~0.05 to ~0.8 over a factor ~2 in steps, 30 log-spaced points
    rng = np.random.default_rng(0)
    steps = np.unique(np.round(np.geomspace(10, 20000, 30)))
    x = np.log(steps)
    y = 0.05 + 0.75 * expit((x - math.log(900)) / 0.15) + rng.normal(0, 0.02, steps.size)
    (t,) = detect_transitions(steps, y)
    half = steps[np.argmax(y > 0.05 + 0.375)]
    assert t.direction == "rise" and 1 / 1.5 <= t.step / half <= 1.5


def test_loss_bump_then_drop():
    # loss decays as a power law with a plateau that ends in a drop at ~2000 steps
    rng = np.random.default_rng(1)
    steps = np.unique(np.round(np.geomspace(1, 50000, 150)))
    x = np.log(steps + 1)
    y = 4 * (steps + 1) ** -0.1 - 0.6 * expit((x - math.log(2000)) / 0.12) + rng.normal(0, 0.03, steps.size)
    found = detect_transitions(steps, y)
    assert [t.direction for t in found] == ["fall"]
    assert abs(math.log(found[0].step / 2000)) < math.log(1.3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=[1, 2, 3], values=[1, 2]), "same length"),
        (dict(steps=list(range(5)), values=[0.0] * 5), "at least"),
        (dict(steps=list(range(30)), values=[0.0] * 29 + [float("nan")]), "NaN"),
        (dict(steps=[1] * 30, values=[0.0] * 30), "distinct"),
        (dict(steps=list(range(30)), values=[0.0] * 30, stderr=[0.0] * 30), "stderr"),
        (dict(steps=list(range(-2, 28)), values=[0.0] * 30), "log_offset"),
    ],
)
def test_invalid_input_raises(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        detect_transitions(kwargs.pop("steps"), kwargs.pop("values"), **kwargs)


def test_invalid_parameters_raise():
    steps, y = _curve()
    with pytest.raises(InvalidInputError):
        detect_transitions(steps, y, baseline_degree=-1)
    with pytest.raises(InvalidInputError):
        detect_transitions(steps, y, window=0)


def test_synthetic_generator_is_seeded():
    a = synthetic_curve(np.random.default_rng(4), n_points=50, n_transitions=2, noise="student_t")
    b = synthetic_curve(np.random.default_rng(4), n_points=50, n_transitions=2, noise="student_t")
    assert np.array_equal(a.values, b.values) and a.midpoints == b.midpoints and len(a.midpoints) == 2


def _bucket_recall(curves, flagged, edges=(0.02, 0.05, 0.1, 0.2, 0.3), moving_only=False):
    """Recall per width bucket; ``moving_only``: only transitions whose noise-free curve moves by
    the detector's min_change (0.1 of the range) across their 10-90% span (not drift-cancelled)."""
    from devinterp.analyses.synthetic import clean_move, match_detail

    hits = {k: [] for k in range(len(edges) - 1)}
    for c, f in zip(curves, flagged, strict=True):
        for k, (hit, w) in enumerate(zip(match_detail(c, f)[0], c.widths, strict=True)):
            if moving_only and clean_move(c, k) < 0.1:
                continue
            hits[min(int(np.searchsorted(edges, w, "right")) - 1, len(edges) - 2)].append(hit)
    return {f"{edges[k]}-{edges[k + 1]}": float(np.mean(v)) for k, v in hits.items() if v}


def test_accuracy_on_synthetic_suite():
    """240 widened curves (10-2000 points, 0-3 transitions of width 0.02-0.3, three noise kinds,
    drift), seed 0: the issue-14 targets, overall and in every width bucket."""
    curves = curve_suite(0, 240)
    flagged = [[t.step for t in detect_transitions(c.steps, c.values)] for c in curves]
    s = score(curves, flagged)
    assert s.drift_only_curves == 60
    assert s.recall >= 0.9, s
    assert s.precision >= 0.9, s
    assert s.false_flags_per_drift_curve <= 0.1, s
    by_width = _bucket_recall(curves, flagged)
    assert len(by_width) == 4 and min(by_width.values()) >= 0.85, by_width
    moving = _bucket_recall(curves, flagged, moving_only=True)
    assert len(moving) == 4 and min(moving.values()) >= 0.9, moving


@functools.lru_cache(maxsize=1)
def _large_suite():
    """Seed 7, 1,200 curves (not tuned on), detected once for both tests below."""
    curves = curve_suite(7, 1200)
    return curves, [[t.step for t in detect_transitions(c.steps, c.values)] for c in curves]


@pytest.mark.slow
def test_accuracy_on_large_synthetic_suite():
    curves, flagged = _large_suite()
    s = score(curves, flagged)
    assert s.recall >= 0.9 and s.precision >= 0.9 and s.false_flags_per_drift_curve <= 0.1, s


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "issue 14, not met: broad transitions (width 0.2-0.3) that drift cancels across their own span "
    "(noise-free move < 10% of the range between the samples bracketing the 10-90% span: "
    "synthetic.clean_move) are rejected by the data-move rule that keeps the demo free of tiny "
    "flags; measured 0.839 on this suite (goal 0.85). Strict: passes -> XPASS fails, so the marker "
    "must go when it is fixed."))
def test_every_width_bucket_on_large_synthetic_suite():
    curves, flagged = _large_suite()
    by_width = _bucket_recall(curves, flagged)
    assert min(by_width.values()) >= 0.85, by_width


@pytest.mark.slow
def test_every_moving_width_bucket_on_large_synthetic_suite():
    """The same suite without the drift-cancelled transitions (noise-free move < 10% of the range
    across their 10-90% span, which the data-move rule leaves unflagged by design): every width
    bucket >= 0.85 (broad bucket measured 0.914, 186 transitions)."""
    curves, flagged = _large_suite()
    moving = _bucket_recall(curves, flagged, moving_only=True)
    assert len(moving) == 4 and min(moving.values()) >= 0.85, moving


@pytest.mark.parametrize("seed", [0, 1])
def test_transition_that_drift_cancels_across_its_span_is_not_flagged(seed):
    """A 10-sd fall (width 0.25) on a linear rise that cancels its 10-90% move: the curve only
    pauses, its move across the span is < 10% of the range (clean_move), so by the real-run rule a
    flag there would be tiny and the detector reports none; on flat drift the same fall is found."""
    from devinterp.analyses.synthetic import SyntheticCurve, clean_move, hit_tolerance

    rng = np.random.default_rng(seed)
    steps = np.unique(np.round(np.geomspace(10, 1e5, 300)))
    x = np.log(steps + 1)
    c, w = math.log(1001.0), 0.25
    slope = 8.0 / (2 * math.log(9) * w)  # noise sd per log step: +8 sd across the 10-90% span
    for drift, moves in ((0.0, True), (slope, False)):
        clean = drift * (x - x[0]) - 10.0 * expit((x - c) / w)
        y = clean + rng.standard_normal(x.size)
        curve = SyntheticCurve(steps, y, (1000.0,), (w,), (-10.0,), 1.0, "gaussian", "linear", clean)
        assert (clean_move(curve, 0) > 0.7) if moves else (abs(clean_move(curve, 0)) < 0.02)
        near = [t for t in detect_transitions(steps, y)
                if t.direction == "fall" and abs(math.log(t.step + 1) - c) <= hit_tolerance(w)]
        assert len(near) == int(moves), (drift, near)


def test_broad_transitions_over_drift_are_found():
    """Widths 0.1-0.3 (10-90% over a factor 1.5-3.7 in steps), 6-14 noise sd, smooth drift."""
    rng = np.random.default_rng(11)
    found = 0
    for _ in range(20):
        c = synthetic_curve(rng, n_points=150, n_transitions=1, width_range=(0.1, 0.3))
        found += score([c], [[t.step for t in detect_transitions(c.steps, c.values)]]).true_positives
    assert found >= 15  # 16/20 measured (seed 11; one curve of 150 points each)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_and_offset_do_not_change_the_flags(seed):
    """values * 10**k + b, k in -12..12: the same flags (steps, directions, widths)."""
    rng = np.random.default_rng(seed)
    c = synthetic_curve(rng, n_points=120, n_transitions=2, noise="student_t")
    y = (c.values - c.values.mean()) / c.values.std()
    ref = detect_transitions(c.steps, y)
    assert ref  # something to compare
    for k in range(-12, 13):
        for b in (0.0, 3.0 * 10.0**k):
            got = detect_transitions(c.steps, y * 10.0**k + b)
            assert [(t.step, t.direction) for t in got] == [(t.step, t.direction) for t in ref], (k, b)
            for g, r in zip(got, ref, strict=True):
                assert g.width == pytest.approx(r.width, rel=1e-6)
                assert g.amplitude == pytest.approx(r.amplitude * 10.0**k, rel=1e-6)
                assert g.magnitude == pytest.approx(r.magnitude, rel=1e-6)


def test_min_change_keeps_smooth_curves_from_flagging_negligible_moves():
    """A noiseless head-score-like curve: a 3% wiggle early, then a rise over 90% of the range."""
    steps = np.unique(np.round(np.geomspace(1, 2000, 80)))
    x = np.log(steps + 1)
    y = 0.02 + 0.003 * expit((x - math.log(20)) / 0.1) + 0.09 * expit((x - math.log(300)) / 0.15)
    found = detect_transitions(steps, y)
    assert [t.direction for t in found] == ["rise"] and 200 < found[0].step < 450, found
    assert detect_transitions(steps, y, min_change=0.0)  # settable; 0 disables it
    assert detect_transitions(steps, y, min_change=0.98) == []  # the rise is 97% of the range
    with pytest.raises(InvalidInputError, match="min_change"):
        detect_transitions(steps, y, min_change=1.5)


def test_min_change_uses_stderr_for_the_range():
    from devinterp.analyses.transitions import curve_range

    v = np.array([0.0, 0.0, 5.0, 1.0, 1.0])
    assert curve_range(v) == 1.0  # the running median ignores the lone outlier
    assert curve_range(v, stderr=np.full(5, 0.1)) == pytest.approx(5.0 - 0.4)
    assert curve_range(v, stderr=np.full(5, 2.0)) == 0.0  # nothing beyond the errors


def test_tracker_replays_and_flags_once():
    from devinterp.analyses.transitions import TransitionTracker, replay

    rng = np.random.default_rng(0)
    steps = np.unique(np.round(np.geomspace(1, 3000, 200)))
    x = np.log(steps + 1)
    y = 0.2 * expit((x - math.log(40)) / 0.1) + 1.0 * expit((x - math.log(400)) / 0.1)
    y = y + rng.normal(0, 0.01, steps.size)
    checks = list(range(100, 3001, 100))
    flags = replay({"m": (steps, y)}, checks)
    assert [round(t.step / 10) * 10 for t in flags] in ([40, 400], [40, 390], [40, 410])
    # the early rise is flagged only once the curve reached 4x its end, the late one at the end
    tracker = TransitionTracker(range_factor=4.0)
    first = [c for c in checks if tracker.update("m", steps[steps <= c], y[steps <= c])]
    assert first and first[0] >= 4 * 40
    again = replay({"m": (steps, y)}, checks, tracker)
    assert again == []  # already flagged: nothing new
    with pytest.raises(InvalidInputError):
        TransitionTracker(range_factor=0.5)


# --- LLC stages --------------------------------------------------------------------------------
def _llc_curve(seed=0):
    rng = np.random.default_rng(seed)
    steps = np.unique(np.round(np.geomspace(10, 50000, 120)))
    x = np.log(steps + 1)
    llc = 5 + 20 * expit((x - math.log(500)) / 0.3) - 8 * expit((x - math.log(8000)) / 0.3)
    return steps, llc + rng.normal(0, 0.5, steps.size)


def test_llc_stages_rise_then_fall():
    steps, llc = _llc_curve()
    res = llc_stages(steps, llc, stderr=np.full(steps.size, 0.5))
    assert [s.kind for s in res.stages] == ["type A", "type B"]
    (b,) = res.boundaries
    assert 800 < b < 5000  # the critical point on the plateau between the rise and the fall
    assert res.stages[0].end == b == res.stages[1].start


def test_llc_stages_two_rises_split_at_plateau_and_flat_curve_is_one_stage():
    rng = np.random.default_rng(2)
    steps = np.unique(np.round(np.geomspace(10, 50000, 150)))
    x = np.log(steps + 1)
    llc = 10 * expit((x - math.log(100)) / 0.2) + 10 * expit((x - math.log(10000)) / 0.2)
    res = llc_stages(steps, llc + rng.normal(0, 0.3, steps.size))
    assert [s.kind for s in res.stages] == ["type A", "type A"]
    assert 300 < res.boundaries[0] < 3000
    flat = llc_stages(steps, 3 + rng.normal(0, 0.3, steps.size))
    assert len(flat.stages) == 1 and flat.boundaries == ()


def test_detect_stages_reports_agreeing_metrics():
    steps, llc = _llc_curve()
    x = np.log(steps + 1)
    rng = np.random.default_rng(3)
    loss = 3 - 1 * expit((x - math.log(520)) / 0.2) + rng.normal(0, 0.05, steps.size)
    ind = 0.05 + 0.75 * expit((x - math.log(480)) / 0.1) + rng.normal(0, 0.03, steps.size)
    res = detect_stages({"llc": (steps, llc), "loss": (steps, loss), "induction/L1H3": (steps, ind)})
    first = res.boundaries[0]
    assert first.metrics == ("induction/L1H3", "llc", "loss") and first.agreement == 1.0
    assert abs(math.log(first.step / 500)) < math.log(1.3)
    assert len(res.stages) == len(res.boundaries) + 1 and res.stages[0].kind == "type A"
    strict = detect_stages({"llc": (steps, llc), "loss": (steps, loss)}, min_agreement=2)
    assert len(strict.boundaries) == 1  # the LLC-only fall at 8000 lacks a second metric
    with pytest.raises(InvalidInputError):
        detect_stages({"loss": (steps,)})
