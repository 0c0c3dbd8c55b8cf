"""Per-row interventions in one batch: the table that lets every request steer differently.

A request's edits are the library's own intervention objects (`AddVector`, `SteerFeature`,
`ClampFeatures`), validated by the library against their site. For a batch, `RowTable` gives
one site function per touched site, registered with the public `intervene(model, {site: fn})`;
it applies each row's interventions to that row alone, with a `RowContext` that hands them the
row's absolute positions (from the hook context) and the row's prompt length. Rows without
edits are returned untouched (their values are copied, never recomputed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interplab.positions import as_positions
from interplab.sites import Site


@dataclass
class RowContext:
    """A `HookContext` seen from one row: what an intervention asks about its forward pass."""

    site: Site
    model: object
    row_positions: Tensor
    """(1, seq) absolute positions of this row's tokens in the current forward pass (-1: padding)."""
    row_prompt_len: Tensor
    """(1,) real tokens in this row's prompt."""

    def positions(self, act: Tensor) -> Tensor:
        return self.row_positions.to(act.device)

    def prompt_len(self, act: Tensor) -> Tensor:
        return self.row_prompt_len.to(act.device)

    def mask(self, act: Tensor, positions=None) -> Tensor:
        return as_positions(positions).mask(self.positions(act), self.prompt_len(act))


@dataclass
class RowTable:
    """Row -> interventions per site, for the rows of the batch currently running.

    `rows[b]` maps a site to row b's interventions there; `prompt_len[b]` is row b's prompt
    length. `keep(indices)` follows the batch when finished rows are dropped.
    """

    rows: list[dict[Site, list[Callable]]]
    prompt_len: Tensor
    _sites: set[Site] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.prompt_len = torch.as_tensor(self.prompt_len, dtype=torch.long)
        self._sites = {site for row in self.rows for site in row}

    @property
    def sites(self) -> list[Site]:
        return sorted(self._sites, key=lambda s: s.name)

    def keep(self, indices: Sequence[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        self.prompt_len = self.prompt_len[list(indices)]

    def site_fns(self) -> dict[str, Callable]:
        """{site name: fn(act, ctx)} for `intervene`; one function per touched site."""
        return {site.name: self._site_fn(site) for site in self.sites}

    def _site_fn(self, site: Site) -> Callable:
        def apply(act: Tensor, ctx) -> Tensor:
            if act.shape[0] != len(self.rows):
                raise RuntimeError(f"batch of {act.shape[0]} rows but the steering table has {len(self.rows)}")
            touched = [b for b, row in enumerate(self.rows) if row.get(site)]
            if not touched:
                return act
            positions = ctx.positions(act)  # (batch, seq) absolute, -1 on padding
            out = list(act.unbind(0)) if len(touched) < act.shape[0] else [None] * act.shape[0]
            for b in touched:
                row_ctx = RowContext(site, ctx.model, positions[b:b + 1], self.prompt_len[b:b + 1])
                row_act = act[b:b + 1]
                for fn in self.rows[b][site]:
                    new = fn(row_act, row_ctx)
                    row_act = row_act if new is None else new
                out[b] = row_act[0]
            return torch.stack(out)

        return apply
