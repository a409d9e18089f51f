import math

import numpy as np
import pytest
import torch

from devinterp.analyses import essential_dynamics
from devinterp.analyses.dynamics import output_matrix
from devinterp.errors import InvalidInputError


def _trajectory(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    steps = np.unique(np.round(np.geomspace(1, 10000, 150)))
    x = np.log(steps + 1)
    xt = math.log(301)
    feat = rng.normal(size=(3, 40))
    if kind == "corner":  # along one direction until step 300, then along another
        out = np.outer(np.minimum(x, xt) - x[0], feat[0]) + np.outer(np.maximum(x - xt, 0), feat[1])
    elif kind == "reversal":  # out and back
        c = np.where(x < xt, x - x[0], 2 * (xt - x[0]) - (x - x[0]))
        out = np.outer(c, feat[0]) + np.outer(0.3 * np.sin(x), feat[2])
    else:  # smooth curve without turning points
        out = np.outer(x, feat[0]) + np.outer(0.2 * x**2, feat[1])
    return steps, out + rng.normal(0, 0.05, out.shape)


@pytest.mark.parametrize("kind, min_deg", [("corner", 60), ("reversal", 120)])
def test_milestone_at_the_turning_point(kind, min_deg):
    steps, out = _trajectory(kind)
    ed = essential_dynamics(out, steps)
    assert len(ed.milestones) == 1
    assert abs(math.log(ed.milestones[0] / 300)) < math.log(1.3)
    assert math.degrees(ed.milestone_angles[0]) > min_deg
    assert ed.explained_variance_ratio[:2].sum() > 0.95
    assert ed.smoothed.shape == (300, 3) and ed.scalars()["essential_dynamics/n_milestones"] == 1.0


def test_smooth_trajectory_has_no_milestone():
    steps, out = _trajectory("smooth")
    assert essential_dynamics(out, steps).milestones == ()


def test_mapping_input_and_validation():
    steps, out = _trajectory("corner")
    a = essential_dynamics(dict(zip(steps.tolist(), out, strict=True)))
    b = essential_dynamics(out, steps)
    assert a.milestones == b.milestones
    with pytest.raises(InvalidInputError, match="at least 5"):
        essential_dynamics(out[:3], steps[:3])
    with pytest.raises(InvalidInputError, match="same number"):
        essential_dynamics([np.zeros(3)] * 4 + [np.zeros(4)])
    with pytest.raises(InvalidInputError, match="n_components"):
        essential_dynamics(out, steps, n_components=0)


def test_output_matrix_from_modules_and_state_dicts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    probe = torch.randn(5, 4)
    sds = []
    for _ in range(6):
        with torch.no_grad():
            model.weight.mul_(1.1)
        sds.append({k: v.clone() for k, v in model.state_dict().items()})
    m = output_matrix(sds, probe, model=torch.nn.Linear(4, 3))
    assert m.shape == (6, 15)
    model.load_state_dict(sds[2])
    assert np.allclose(m[2], model(probe).detach().double().numpy().reshape(-1))
    assert np.allclose(output_matrix([model], probe)[0], m[2])
    with pytest.raises(InvalidInputError, match="model="):
        output_matrix(sds, probe)
