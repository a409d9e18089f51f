"""Lightning callbacks: thin adapters that schedule, call an analysis and log (imported lazily)."""

from devinterp._lazy import lazy_exports

_EXPORTS = {
    "SnapshotCallback": "devinterp.callbacks.snapshot",
    "LLCCallback": "devinterp.callbacks.llc",
    "CircuitCallback": "devinterp.callbacks.circuits",
    "TransitionCallback": "devinterp.callbacks.transitions",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
