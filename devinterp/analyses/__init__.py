"""Analyses of weights and training curves. Usable without Lightning (imported lazily)."""

import sys
import types

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
    "composition_scores_by_kind": "devinterp.analyses.composition",
    "composition_baseline": "devinterp.analyses.composition",
    "ov_copying_scores": "devinterp.analyses.composition",
    "qk_previous_token_scores": "devinterp.analyses.composition",
    "weight_circuit_scalars": "devinterp.analyses.composition",
    "ModuleAttention": "devinterp.analyses.attention_adapters",
    "transformer_lens_attention": "devinterp.analyses.attention_adapters",
    "hf_eager_attention": "devinterp.analyses.attention_adapters",
    # data and losses for language models (issue 12)
    "lm_loss": "devinterp.analyses.losses",
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


class _Package(types.ModuleType):
    """Keeps exported *functions* that share their name with a submodule (``head_params``).

    Importing ``devinterp.analyses.head_params`` would otherwise set the package attribute to the
    submodule, so ``from devinterp.analyses import head_params`` gave the module. The submodule
    stays importable by its full name (``from devinterp.analyses.head_params import ...``).
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
