"""interplab: look inside a Hugging Face causal LM and change what it does.

Importing the package only defines names; heavy modules (torch, transformers)
load on first use of the attribute that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from interplab._lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, PEP 562)
_EXPORTS = {
    "load": "interplab.models.loading",
    "LoadedModel": "interplab.models.loading",
    "Architecture": "interplab.models.arch",
    "Site": "interplab.sites",
    "parse_site": "interplab.sites",
    "capture": "interplab.cache",
    "ActivationCache": "interplab.cache",
    "intervene": "interplab.interventions",
    "Intervention": "interplab.interventions",
    "add_vector": "interplab.interventions",
    "project_out": "interplab.interventions",
    "clamp_direction": "interplab.interventions",
    "zero_ablate": "interplab.interventions",
    "mean_ablate": "interplab.interventions",
    "resample_ablate": "interplab.interventions",
    "patch": "interplab.interventions",
    "generate": "interplab.generation",
    "Positions": "interplab.positions",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_attributes('interplab', _EXPORTS, __all__)


if TYPE_CHECKING:  # pragma: no cover
    from interplab.cache import ActivationCache, capture
    from interplab.generation import generate
    from interplab.interventions import (
        Intervention, add_vector, clamp_direction, intervene, mean_ablate,
        patch, project_out, resample_ablate, zero_ablate,
    )
    from interplab.models.arch import Architecture
    from interplab.models.loading import LoadedModel, load
    from interplab.positions import Positions
    from interplab.sites import Site, parse_site
