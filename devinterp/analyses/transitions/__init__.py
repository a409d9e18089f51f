"""Phase-transition detection on training curves (issue 6).

- :func:`detect_transitions`: sigmoid/step transitions of one curve against smooth drift.
- :func:`llc_stages`: stage boundaries at critical points of the smoothed LLC (Hoogland et al. 2024).
- :class:`TransitionTracker` / :func:`replay`: the online flagging rule (``TransitionCallback``).
- :func:`detect_stages`: several curves combined into stage boundaries with the metrics that agree.
"""

from devinterp.analyses.transitions.detect import Transition, curve_range, detect_transitions
from devinterp.analyses.transitions.llc import LLCStages, Stage, llc_stages
from devinterp.analyses.transitions.online import TransitionTracker, relative_move, replay
from devinterp.analyses.transitions.smoothing import local_poly
from devinterp.analyses.transitions.stages import StageBoundary, StageResult, detect_stages

__all__ = [
    "LLCStages", "Stage", "StageBoundary", "StageResult", "Transition", "TransitionTracker",
    "curve_range", "detect_stages", "detect_transitions", "llc_stages", "local_poly",
    "relative_move", "replay",
]
