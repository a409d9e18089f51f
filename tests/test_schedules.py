import numpy as np
import pytest

from devinterp.errors import ScheduleError
from devinterp.schedules import at, every, log_spaced, union


def test_every_lists_multiples_and_offset():
    assert every(3).steps(10) == [0, 3, 6, 9]
    assert every(5, offset=2).steps(12) == [2, 7, 12]
    assert every(4).is_due(8) and not every(4).is_due(9)


def test_log_spaced_exact_count_distinct_sorted_and_endpoints():
    steps = log_spaced(100, stop=5000).steps()
    assert len(steps) == 100
    assert steps == sorted(set(steps))
    assert steps[0] == 1 and steps[-1] == 5000
    # late points are geometric: consecutive ratios roughly constant
    ratios = np.diff(np.log(steps[-30:]))
    assert ratios.std() / ratios.mean() < 0.1


def test_log_spaced_more_points_than_steps_gives_every_step():
    assert log_spaced(10, stop=5).steps() == [1, 2, 3, 4, 5]


def test_log_spaced_unresolved_needs_total():
    sched = log_spaced(10)
    assert not sched.resolved
    with pytest.raises(ScheduleError, match="resolve"):
        sched.is_due(3)
    resolved = sched.resolve(1000)
    assert resolved.resolved and resolved.steps()[-1] == 1000
    with pytest.raises(ScheduleError, match="max_steps"):
        sched.resolve(None)


def test_union_and_or():
    s = log_spaced(5, stop=1000) | every(500)
    assert s.steps(1000) == [0, 1, 6, 32, 178, 500, 1000]
    u = union(at([3, 7]), every(10))
    assert u.steps(20) == [0, 3, 7, 10, 20]
    assert 7 in u and 8 not in u
    assert not (log_spaced(3) | every(2)).resolved


@pytest.mark.parametrize(
    "make",
    [lambda: every(0), lambda: every(-3), lambda: log_spaced(0), lambda: log_spaced(5, start=0),
     lambda: log_spaced(5, start=10, stop=5), lambda: at([-1, 4]), lambda: at([1.5]), lambda: union()],
)
def test_bad_schedules_raise_clear_errors(make):
    with pytest.raises(ScheduleError):
        make()


def test_at_accepts_numpy_ints():
    assert at(np.array([5, 1, 5])).steps() == [1, 5]
