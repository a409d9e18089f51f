import pytest
import torch

from devinterp.analyses.theory import (
    dln_llc,
    make_dln_problem,
    make_normal_crossing_problem,
    make_regular_problem,
    make_rrr_problem,
    normal_crossing_llc,
    regular_llc,
    rrr_llc,
)
from devinterp.errors import InvalidInputError


@pytest.mark.parametrize("m,h,n,expected", [
    (5, 3, 5, 6.5), (5, 4, 5, 8.0), (4, 3, 8, 6.0), (8, 3, 4, 6.0), (3, 8, 4, 6.0)])
def test_rrr_reference_values(m, h, n, expected):
    assert rrr_llc(m, n, h, 0) == expected


@pytest.mark.parametrize("widths,r,expected", [
    ([10, 10, 10], 0, 37.5), ([10, 10, 10], 5, 47.0), ([10, 10, 10, 10], 3, 42.0),
    ([4, 5, 6, 4], 1, 7.5), ([6, 6, 6, 6], 2, 15.5), ([10] * 5, 5, 45.5)])
def test_dln_reference_values(widths, r, expected):
    assert dln_llc(widths, r) == pytest.approx(expected)


@pytest.mark.parametrize("m,h,n,r", [(m, h, n, r) for m in (2, 3, 5, 7) for h in (1, 2, 4, 6)
                                     for n in (2, 3, 6) for r in range(0, min(h, m, n) + 1)])
def test_one_hidden_layer_dln_equals_rrr(m, h, n, r):
    assert dln_llc([m, h, n], r) == pytest.approx(rrr_llc(m, n, h, r))


def test_regular_and_normal_crossing():
    assert regular_llc(10) == 5
    assert normal_crossing_llc((1, 1)) == 0.5
    assert normal_crossing_llc((2, 2)) == 0.25
    assert normal_crossing_llc((5, 3)) == pytest.approx(1 / 10)
    assert normal_crossing_llc((1, 3)) == pytest.approx(1 / 6)


def test_llc_never_exceeds_half_the_parameters():
    for widths in ([3, 4, 5], [5, 2, 5, 3], [6, 6, 6, 6]):
        d = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
        for r in range(min(widths) + 1):
            assert 0 <= dln_llc(widths, r) <= d / 2


@pytest.mark.parametrize("call", [
    lambda: rrr_llc(3, 3, 1, 2), lambda: dln_llc([3], 0), lambda: dln_llc([3, 2, 3], 3),
    lambda: normal_crossing_llc(()), lambda: normal_crossing_llc((0, 1)),
    lambda: regular_llc(-1), lambda: make_dln_problem([2, 2], 1, 1)])
def test_bad_arguments(call):
    with pytest.raises(InvalidInputError):
        call()


def test_problems_are_at_the_true_parameter():
    p = make_dln_problem([4, 5, 3], 2, 200, seed=1, noise_std=0.0)
    x, y = p.data
    with torch.no_grad():
        assert float(p.loss_fn(p.model, (x, y))) < 1e-10
    w = p.model[1].weight @ p.model[0].weight
    assert torch.linalg.matrix_rank(w) == 2
    assert p.llc == dln_llc([4, 5, 3], 2) and p.num_params == 4 * 5 + 5 * 3
    assert make_rrr_problem(5, 3, 5, 0, 50).llc == 6.5
    nc = make_normal_crossing_problem((1, 2), 50, noise_std=0.0)
    with torch.no_grad():
        assert float(nc.loss_fn(nc.model, nc.data)) == 0.0 and nc.llc == 0.25
    reg = make_regular_problem(3, 2, 50)
    assert reg.llc == 4.0 and reg.num_params == 8
