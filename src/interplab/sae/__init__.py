"""Sparse autoencoders: families (ReLU, TopK, BatchTopK, JumpReLU), training on activation
streams, activation-only metrics, and folders in interplab's, SAELens' and sparsify's layouts.

Names load on first use, so importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from interplab._lazy import lazy_attributes

_EXPORTS = {
    "SAEConfig": "interplab.sae.config",
    "FAMILIES": "interplab.sae.config",
    "SAE": "interplab.sae.model",
    "SAEOutput": "interplab.sae.model",
    "geometric_median": "interplab.sae.model",
    "TrainConfig": "interplab.sae.train",
    "train_sae": "interplab.sae.train",
    "train_saes": "interplab.sae.train",
    "SAEMetrics": "interplab.sae.metrics",
    "MetricsAccumulator": "interplab.sae.metrics",
    "evaluate_sae": "interplab.sae.metrics",
    "ce_loss_recovered": "interplab.sae.metrics",
    "fraction_of_variance_unexplained": "interplab.sae.metrics",
    "mse": "interplab.sae.metrics",
    "l0": "interplab.sae.metrics",
    "dead_fraction": "interplab.sae.metrics",
    "SAEFormatError": "interplab.sae.formats",
    "save_sae": "interplab.sae.formats",
    "load_sae": "interplab.sae.formats",
    "detect_layout": "interplab.sae.formats",
    "save_saelens": "interplab.sae.formats",
    "load_saelens": "interplab.sae.formats",
    "load_sparsify": "interplab.sae.formats",
    "saelens_hook_to_site": "interplab.sae.formats",
    "sparsify_hookpoint_to_site": "interplab.sae.formats",
    "StoreConfig": "interplab.sae.store",
    "ActivationStore": "interplab.sae.store",
    "ActivationChunk": "interplab.sae.store",
    "harvest_to_disk": "interplab.sae.store",
    "corpus_windows": "interplab.sae.store",
    "iter_documents": "interplab.sae.store",
    "read_manifest": "interplab.sae.store",
    "evaluate_downstream": "interplab.sae.downstream",
    "DownstreamMetrics": "interplab.sae.downstream",
    "SAEEvaluation": "interplab.sae.downstream",
    "resolve_sae_site": "interplab.sae.downstream",
    "build_feature_index": "interplab.sae.features",
    "FeatureIndex": "interplab.sae.features",
    "inspect": "interplab.sae.features",
    "contrast": "interplab.sae.features",
    "feature_vocab_effect": "interplab.sae.features",
    "auto_label": "interplab.sae.features",
    "write_feature_card": "interplab.sae.card",
    "steer_feature": "interplab.sae.steer",
    "clamp_feature": "interplab.sae.steer",
    "ablate_feature": "interplab.sae.steer",
    "splice_sae": "interplab.sae.steer",
    "FeatureLogitBias": "interplab.sae.steer",
    "compare_steering": "interplab.sae.steer",
    "decoder_direction": "interplab.sae.steer",
    "vocab_bias": "interplab.sae.steer",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_attributes('interplab.sae', _EXPORTS, __all__)


if TYPE_CHECKING:  # pragma: no cover
    from interplab.sae.config import FAMILIES, SAEConfig
    from interplab.sae.formats import (
        SAEFormatError, detect_layout, load_sae, load_saelens, load_sparsify, save_sae,
        save_saelens, saelens_hook_to_site, sparsify_hookpoint_to_site,
    )
    from interplab.sae.metrics import (
        MetricsAccumulator, SAEMetrics, ce_loss_recovered, dead_fraction, evaluate_sae,
        fraction_of_variance_unexplained, l0, mse,
    )
    from interplab.sae.model import SAE, SAEOutput, geometric_median
    from interplab.sae.train import TrainConfig, train_sae, train_saes
