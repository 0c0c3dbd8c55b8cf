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

MODES = ("all", "prompt", "generated", "range", "at", "after")
"""The kinds of selection a `Positions` value can be."""
NAMED = ("all", "prompt", "generated")
"""The modes a string shorthand may name."""


@dataclass(frozen=True)
class Positions:
    """A set of absolute positions. Build with the class methods, or pass a shorthand:
    None/"all", "prompt", "generated", an int, a slice, or a list of ints. Negative
    indices count back from the end of the prompt (-1 is the last prompt token).

    Mode "after" (`Positions.after(marker)`) is anchored in each row's prompt instead: `indices`
    holds a token sequence, and the selection starts `start` tokens after the end of its last
    occurrence in the row's prompt (0: the first token after it), whatever follows it."""

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
        if self.mode == "after" and (not self.indices or self.start is None or self.stop is not None):
            raise UserInputError("Positions.after() needs a non-empty token sequence and an int offset")
        if self.mode not in ("range", "after") and (self.start is not None or self.stop is not None):
            raise UserInputError(f"start/stop only apply to mode 'range', not {self.mode!r}")
        if self.mode not in ("at", "after") and self.indices:
            raise UserInputError(f"indices only apply to modes 'at' and 'after', not {self.mode!r}")

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

    @classmethod
    def after(cls, marker: "tuple[int, ...] | list[int]", offset: int = 0) -> "Positions":
        """From `offset` tokens after the last occurrence of the token sequence `marker` in each
        row's prompt onward (e.g. the chat template's assistant header: text appended after it
        does not move the start). A row whose prompt lacks the marker is an error."""
        return cls("after", offset, None, tuple(marker))

    def mask(self, positions: Int[Tensor, "batch seq"], prompt_len: Int[Tensor, "batch"],
             prompt_ids: Int[Tensor, "batch prompt"] | None = None,
             prompt_positions: Int[Tensor, "batch prompt"] | None = None) -> Bool[Tensor, "batch seq"]:
        """True where this spec selects the token; padding (position -1) is never selected.
        Mode "after" also needs the prompt's token ids and their absolute positions."""
        real = positions >= 0
        plen = prompt_len[:, None]
        if self.mode == "after":
            starts = _marker_ends(self.indices, prompt_ids, prompt_positions) + self.start
            return real & (positions >= starts.to(positions.device)[:, None])
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


def _marker_ends(marker: tuple[int, ...], ids: Tensor | None, positions: Tensor | None) -> Tensor:
    """(batch,) absolute position just after the last occurrence of `marker` in each row."""
    if ids is None or positions is None or ids.dim() != 2:
        raise UserInputError("positions anchored on a token sequence need the prompt's token ids "
                             "(inputs_embeds cannot be searched)")
    ends = []
    pattern = torch.tensor(marker, device=ids.device)
    for row in range(ids.shape[0]):
        real = positions[row] >= 0
        tokens, where = ids[row][real], positions[row][real]
        n = len(marker)
        hits = [] if tokens.shape[0] < n else \
            (tokens.unfold(0, n, 1) == pattern).all(-1).nonzero().flatten().tolist()
        if not hits:
            raise UserInputError(f"prompt row {row} does not contain the token sequence {list(marker)} "
                                 "these positions are anchored on (for 'caa': the chat template's "
                                 "assistant header); format the prompt with the model's chat template")
        ends.append(int(where[hits[-1] + n - 1]) + 1)
    return torch.tensor(ends)


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
