"""Type aliases for the public API.

`ModelLike`: what every function that takes a `model` accepts, an interplab `LoadedModel`
(from `interplab.load`) or a bare Hugging Face causal LM (wrapped on the fly).
`PositionsLike`: a token selection, a `Positions` value or one of its shorthands (None/"all",
"prompt", "generated", an int, a slice, a list of ints; see `interplab.positions`).

This module imports torch; the package's `__init__` does not import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from torch import nn

from interplab.models.handle import LoadedModel
from interplab.positions import Positions

ModelLike = Union[LoadedModel, nn.Module]
PositionsLike = Union[Positions, str, int, slice, Sequence[int], None]
