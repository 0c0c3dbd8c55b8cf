"""Toy models that explain why steering and SAEs work: superposition and grokking.

* `interplab.toy.superposition`: toy models of superposition (Elhage et al. 2022).
* `interplab.toy.grokking`: grokking on modular addition (Power et al. 2022; Nanda et al. 2023).
* `interplab.toy.plots`: their figures; `interplab.toy.experiments`: the CLI's paper experiments.

Names are imported lazily, so importing this package does not import torch.
"""

from __future__ import annotations

from interplab._lazy import lazy_attributes

_EXPORTS = {
    "SuperpositionConfig": "interplab.toy.superposition",
    "ToyModel": "interplab.toy.superposition",
    "train_superposition": "interplab.toy.superposition",
    "report": "interplab.toy.superposition",
    "feature_norms": "interplab.toy.superposition",
    "superposition_interference": "interplab.toy.superposition",
    "feature_dimensionality": "interplab.toy.superposition",
    "dimensions_per_feature": "interplab.toy.superposition",
    "n_represented": "interplab.toy.superposition",
    "phase_diagram": "interplab.toy.superposition",
    "GrokkingConfig": "interplab.toy.grokking",
    "GrokTransformer": "interplab.toy.grokking",
    "train_grokking": "interplab.toy.grokking",
    "phase_steps": "interplab.toy.grokking",
    "key_frequencies": "interplab.toy.grokking",
    "embedding_frequency_norms": "interplab.toy.grokking",
    "progress_measures": "interplab.toy.grokking",
    "load_model": "interplab.toy.grokking",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_attributes('interplab.toy', _EXPORTS, __all__)
