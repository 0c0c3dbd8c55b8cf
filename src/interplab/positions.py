"""Which token positions an intervention touches, in absolute positions.

A position is the index of a token among the real (non-padding) tokens of its
row, counted from the start of the prompt. The hook layer computes it for every
forward pass from the attention mask, so it means the same thing with and
without the KV cache and with left padding. `prompt_len` is the number of real
tokens in a row's first forward pass inside the intervention (its prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interplab.errors import UserInputError

MODES = ("all", "prompt", "generated", "range", "at")
"""The kinds of selection a `Positions` value can be."""
NAMED = ("all", "prompt", "generated")
"""The modes a string shorthand may name."""


@dataclass(frozen=True)
class Positions:
    """A set of absolute positions. Build with the class methods, or pass a shorthand:
    None/"all", "prompt", "generated", an int, a slice, or a list of ints. Negative
    indices count back from the end of the prompt (-1 is the last prompt token)."""

    mode: str = "all"
    start: int | None = None
    stop: int | None = None
    indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserInputError(f"unknown positions mode {self.mode!r}; valid modes are "
                                 f"{', '.join(MODES)}")
        for name in ("start", "stop"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise UserInputError(f"Positions {name} must be an int or None, got {value!r}")
        if not isinstance(self.indices, tuple) or not all(_is_int(i) for i in self.indices):
            raise UserInputError(f"Positions indices must be a tuple of ints, got {self.indices!r}")
        if self.mode == "at" and not self.indices:
            raise UserInputError("Positions.at() needs at least one position")
        if self.mode != "range" and (self.start is not None or self.stop is not None):
            raise UserInputError(f"start/stop only apply to mode 'range', not {self.mode!r}")
        if self.mode != "at" and self.indices:
            raise UserInputError(f"indices only apply to mode 'at', not {self.mode!r}")

    @classmethod
    def all(cls) -> "Positions":
        return cls("all")

    @classmethod
    def prompt(cls) -> "Positions":
        """Only prompt tokens."""
        return cls("prompt")

    @classmethod
    def generated(cls) -> "Positions":
        """Only tokens produced by generate() (positions >= prompt length)."""
        return cls("generated")

    @classmethod
    def from_(cls, start: int) -> "Positions":
        """Position `start` onward (negative: from the end of the prompt, e.g. -3 = last 3 prompt
        tokens and everything generated; CAA steers from the end of the instruction on)."""
        return cls("range", start, None)

    @classmethod
    def first(cls, n: int) -> "Positions":
        """The first n positions of the prompt (ActAdd injects there)."""
        return cls("range", 0, n)

    @classmethod
    def span(cls, start: int | None, stop: int | None) -> "Positions":
        return cls("range", start, stop)

    @classmethod
    def at(cls, *indices: int) -> "Positions":
        for i in indices:
            if not _is_int(i):
                raise UserInputError(f"positions must be ints, got {i!r}")
        return cls("at", indices=tuple(int(i) for i in indices))

    def mask(self, positions: Int[Tensor, "batch seq"], prompt_len: Int[Tensor, "batch"]
             ) -> Bool[Tensor, "batch seq"]:
        """True where this spec selects the token; padding (position -1) is never selected."""
        real = positions >= 0
        plen = prompt_len[:, None]
        if self.mode == "all":
            return real
        if self.mode == "prompt":
            return real & (positions < plen)
        if self.mode == "generated":
            return real & (positions >= plen)
        if self.mode == "range":
            selected = real
            if self.start is not None:
                selected = selected & (positions >= _absolute(self.start, plen))
            if self.stop is not None:
                selected = selected & (positions < _absolute(self.stop, plen))
            return selected
        selected = torch.zeros_like(real)
        for index in self.indices:
            selected |= positions == _absolute(index, plen)
        return selected & real


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _absolute(index: int, prompt_len: Tensor) -> Tensor | int:
    return index if index >= 0 else prompt_len + index


def as_positions(spec) -> Positions:
    """Turn a shorthand into `Positions`, or explain what is accepted."""
    if spec is None:
        return Positions.all()
    if isinstance(spec, Positions):
        return spec
    if isinstance(spec, str):
        if spec not in NAMED:
            raise UserInputError(f"positions={spec!r} is not a known selection; named selections "
                                 f"are {', '.join(repr(m) for m in NAMED)} (or give an int, a slice, "
                                 "a list of ints, or a Positions value)")
        return Positions(spec)
    if isinstance(spec, bool):
        raise UserInputError("positions cannot be a bool")
    if isinstance(spec, int):
        return Positions.at(spec)
    if isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise UserInputError("position slices cannot have a step")
        return Positions.span(spec.start, spec.stop)
    if isinstance(spec, (list, tuple)) and spec and all(_is_int(i) for i in spec):
        return Positions.at(*spec)
    raise UserInputError(
        f"positions={spec!r} is not understood: use None/'all', 'prompt', 'generated', an int, "
        "a slice, a list of ints, or a Positions value (Positions.from_(k), Positions.first(n))"
    )
