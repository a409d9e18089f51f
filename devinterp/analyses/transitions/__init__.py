"""Phase-transition detection on training curves (issue 6).

- :func:`detect_transitions`: sigmoid/step transitions of one curve against smooth drift.
- :func:`llc_stages`: stage boundaries at critical points of the smoothed LLC (Hoogland et al. 2024).
- :func:`detect_stages`: several curves combined into stage boundaries with the metrics that agree.
"""

from devinterp.analyses.transitions.detect import Transition, detect_transitions

__all__ = ["Transition", "detect_transitions"]
