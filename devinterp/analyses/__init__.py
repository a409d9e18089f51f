"""Analyses of weights and training curves. Usable without Lightning (imported lazily)."""

from devinterp._lazy import lazy_exports

_EXPORTS = {
    # LLC estimation (issue 3)
    "estimate_llc": "devinterp.analyses.llc",
    "LLCResult": "devinterp.analyses.llc",
    # calibration (issue 4)
    "calibrate": "devinterp.analyses.calibration",
    "Calibration": "devinterp.analyses.calibration",
    # circuits (issue 5)
    "induction_scores": "devinterp.analyses.circuits",
    "HeadScores": "devinterp.analyses.circuits",
    "icl_score": "devinterp.analyses.circuits",
    "head_params": "devinterp.analyses.head_params",
    "head_params_from_projections": "devinterp.analyses.head_params",
    "capture_attention": "devinterp.analyses.attention_capture",
    # weight-space circuits (issue 15)
    "HeadWeights": "devinterp.analyses.head_access",
    "head_weights": "devinterp.analyses.head_access",
    "composition_scores": "devinterp.analyses.composition",
    "composition_baseline": "devinterp.analyses.composition",
    "ov_copying_scores": "devinterp.analyses.composition",
    "qk_previous_token_scores": "devinterp.analyses.composition",
    "weight_circuit_scalars": "devinterp.analyses.composition",
    # transitions (issue 6)
    "detect_transitions": "devinterp.analyses.transitions",
    "detect_stages": "devinterp.analyses.transitions",
    "Transition": "devinterp.analyses.transitions",
    "essential_dynamics": "devinterp.analyses.dynamics",
    "EssentialDynamics": "devinterp.analyses.dynamics",
    "llc_stages": "devinterp.analyses.transitions",
    "Stage": "devinterp.analyses.transitions",
    "StageBoundary": "devinterp.analyses.transitions",
    "StageResult": "devinterp.analyses.transitions",
    "LLCStages": "devinterp.analyses.transitions",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
