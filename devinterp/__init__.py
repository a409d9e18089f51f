"""devinterp: watch the internal structure of a network form during training, and find when.

Public entry points (imported lazily):

- :class:`devinterp.store.SnapshotStore`: the on-disk snapshot store.
- :mod:`devinterp.schedules`: ``every``, ``log_spaced``, ``at``.
- :mod:`devinterp.analyses`: ``estimate_llc``, ``calibrate``, ``induction_scores``, ``detect_transitions``...
- :mod:`devinterp.callbacks`: Lightning callbacks (``SnapshotCallback``, ``LLCCallback``, ...).
"""

from devinterp._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "SnapshotStore": "devinterp.store",
    "Snapshot": "devinterp.store",
    "every": "devinterp.schedules",
    "log_spaced": "devinterp.schedules",
    "at": "devinterp.schedules",
    "union": "devinterp.schedules",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS) + ["__version__"]
