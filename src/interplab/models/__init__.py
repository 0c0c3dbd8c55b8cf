"""Model loading and the per-architecture layout table."""

from interplab.models.arch import ARCHITECTURES, Architecture, register_architecture
from interplab.models.handle import LoadedModel, as_loaded
from interplab.models.loading import ALIASES, DEFAULT_MODEL, load

__all__ = ["ALIASES", "ARCHITECTURES", "Architecture", "DEFAULT_MODEL", "LoadedModel", "as_loaded",
           "load", "register_architecture"]
