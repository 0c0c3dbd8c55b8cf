"""SAE evaluations beyond reconstruction: feature absorption, k-sparse probing, automated
interpretability, and a results table per SAE. Names load on first use."""

from __future__ import annotations

from interplab._lazy import lazy_attributes

_EXPORTS = {
    "feature_absorption": "interplab.sae.evals.absorption",
    "AbsorptionResult": "interplab.sae.evals.absorption",
    "sparse_probing": "interplab.sae.evals.probing",
    "ProbingTask": "interplab.sae.evals.probing",
    "SparseProbingResult": "interplab.sae.evals.probing",
    "tokenizer_tasks": "interplab.sae.evals.tasks",
    "caa_task": "interplab.sae.evals.tasks",
    "chat_client": "interplab.sae.evals.autointerp",
    "interpret": "interplab.sae.evals.autointerp",
    "detection_score": "interplab.sae.evals.autointerp",
    "simulation_score": "interplab.sae.evals.simulation",
    "explain_features": "interplab.sae.evals.autointerp_run",
    "bench_sae": "interplab.sae.evals.table",
    "write_results": "interplab.sae.evals.table",
    "read_results": "interplab.sae.evals.table",
    "plot_comparison": "interplab.sae.evals.table",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attributes("interplab.sae.evals", _EXPORTS, __all__)
