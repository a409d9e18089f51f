"""Post-hoc analysis of a finished (or running) training run's snapshots.

Point it at a snapshot store or a folder of Lightning ``.ckpt`` files, choose analyses, and get
per-snapshot results (``results.jsonl``, resumable), tables, transitions and TensorBoard events;
the same call spreads the snapshots over processes, devices and nodes with Lightning Fabric.

    >>> from devinterp.posthoc import analyze, LLCAnalysis        # doctest: +SKIP
    >>> summary = analyze("runs/x/snapshots", [LLCAnalysis(num_draws=200)], data=(x, y),
    ...                   loss="mypkg.losses:mse")                 # doctest: +SKIP

See ``docs/posthoc.md`` for the contracts of the model / data / loss factories and the files.
"""

from devinterp._lazy import lazy_exports

_EXPORTS = {
    "analyze": "devinterp.posthoc.api",
    "Analysis": "devinterp.posthoc.analyses",
    "AnalysisContext": "devinterp.posthoc.analyses",
    "LLCAnalysis": "devinterp.posthoc.analyses",
    "CircuitAnalysis": "devinterp.posthoc.analyses",
    "config_hash": "devinterp.posthoc.analyses",
    "derive_seed": "devinterp.posthoc.analyses",
    "ResultRecord": "devinterp.posthoc.results",
    "ResultsFile": "devinterp.posthoc.results",
    "parse_steps": "devinterp.posthoc.plan",
    "Job": "devinterp.posthoc.runner",
    "RunSummary": "devinterp.posthoc.runner",
    "run_job": "devinterp.posthoc.runner",
    "load_results": "devinterp.posthoc.api",
    "write_report": "devinterp.posthoc.api",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
