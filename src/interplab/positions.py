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


@dataclass(frozen=True)
class Positions:
    """A set of absolute positions. Build with the class methods, or pass a shorthand:
    None/"all", "prompt", "generated", an int, a slice, or a list of ints. Negative
    indices count back from the end of the prompt (-1 is the last prompt token)."""

    mode: str = "all"
    start: int | None = None
    stop: int | None = None
    indices: tuple[int, ...] = ()

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


def _absolute(index: int, prompt_len: Tensor) -> Tensor | int:
    return index if index >= 0 else prompt_len + index


def as_positions(spec) -> Positions:
    """Turn a shorthand into `Positions`, or explain what is accepted."""
    if spec is None:
        return Positions.all()
    if isinstance(spec, Positions):
        return spec
    if isinstance(spec, str) and spec in ("all", "prompt", "generated"):
        return Positions(spec)
    if isinstance(spec, bool):
        raise TypeError("positions cannot be a bool")
    if isinstance(spec, int):
        return Positions.at(spec)
    if isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise ValueError("position slices cannot have a step")
        return Positions.span(spec.start, spec.stop)
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) for i in spec):
        return Positions.at(*spec)
    raise ValueError(
        f"positions={spec!r} is not understood: use None/'all', 'prompt', 'generated', an int, "
        "a slice, a list of ints, or a Positions value (Positions.from_(k), Positions.first(n))"
    )
