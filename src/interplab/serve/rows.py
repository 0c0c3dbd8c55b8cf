"""Per-row interventions in one batch: the table that lets every request steer differently.

A request's edits are the library's own intervention objects (`AddVector`, `SteerFeature`,
`ClampFeatures`), validated by the library against their site. For a batch, `RowTable` gives
one site function per touched site, registered with the public `intervene(model, {site: fn})`:

- vector additions (plain `AddVector`s) go into a per-row table: row -> scale·vector and a
  position mask computed by the vector's own `Positions` from the hook context's absolute
  positions and the row's prompt length; one `where` per addition slot adds them to every row
  at once (x + scale·v where the mask is true: what `AddVector` computes);
- any other intervention (SAE edits) runs on its row alone, with a `RowContext` that hands it
  that row's positions and prompt length.

Rows without edits are returned untouched, value for value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interplab.interventions import AddVector
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
    row_prompt_ids: Tensor | None = None
    """(1, prompt) this row's prompt token ids (for positions that look for a marker, e.g. "caa")."""

    def positions(self, act: Tensor) -> Tensor:
        return self.row_positions.to(act.device)

    def prompt_len(self, act: Tensor) -> Tensor:
        return self.row_prompt_len.to(act.device)

    def mask(self, act: Tensor, positions=None) -> Tensor:
        ids = self.row_prompt_ids
        return as_positions(positions).mask(self.positions(act), self.prompt_len(act),
                                            *_prompt_args(ids, act.device))


def _prompt_args(ids: Tensor | None, device) -> tuple:
    """(prompt_ids, prompt_positions) for `Positions.mask`: a row's prompt holds no padding, so its
    absolute positions are 0..n-1."""
    if ids is None:
        return None, None
    ids = ids.to(device)
    return ids, torch.arange(ids.shape[-1], device=device).expand_as(ids)


def _is_plain_add(fn) -> bool:
    return isinstance(fn, AddVector) and not fn.norm_preserving


@dataclass
class RowTable:
    """Row -> interventions per site, for the rows of the batch currently running.

    `rows[b]` maps a site to row b's interventions there; `prompt_len[b]` is row b's prompt
    length. `keep(indices)` follows the batch when finished rows are dropped.
    """

    rows: list[dict[Site, list[AddVector | Callable]]]
    """Plain `AddVector` values (added for all rows at once) or bound site functions fn(act, ctx)."""
    prompt_len: Tensor | Sequence[int]
    """Stored as a (batch,) long tensor."""
    prompt_ids: list[Tensor] | None = None
    """Each row's prompt token ids (1-D), so that positions found from the prompt's own tokens
    ("caa": after the chat template's assistant header) work per row and follow dropped rows."""
    _sites: set[Site] = field(default_factory=set, init=False)
    _deltas: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.prompt_len = torch.as_tensor(self.prompt_len, dtype=torch.long)
        self._sites = {site for row in self.rows for site in row}

    @property
    def sites(self) -> list[Site]:
        return sorted(self._sites, key=lambda s: s.name)

    def keep(self, indices: Sequence[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        self.prompt_len = self.prompt_len[list(indices)]
        if self.prompt_ids is not None:
            self.prompt_ids = [self.prompt_ids[i] for i in indices]
        self._deltas.clear()

    def site_fns(self) -> dict[str, Callable]:
        """{site name: fn(act, ctx)} for `intervene`; one function per touched site."""
        return {site.name: self._site_fn(site) for site in self.sites}

    def _site_fn(self, site: Site) -> Callable:
        def apply(act: Tensor, ctx) -> Tensor:
            if act.shape[0] != len(self.rows):
                raise RuntimeError(f"batch of {act.shape[0]} rows but the steering table has {len(self.rows)}")
            positions = ctx.positions(act)  # (batch, seq) absolute, -1 on padding
            act = self._add_vectors(act, site, positions)
            return self._per_row(act, site, ctx, positions)

        return apply

    # --- vector additions, all rows at once ----------------------------------------------------
    def _additions(self, site: Site) -> list[list[AddVector | None]]:
        """slots[k][b]: row b's k-th vector addition at `site` (None: no k-th addition)."""
        adds = [row.get(site, []) if all(_is_plain_add(f) for f in row.get(site, [])) else []
                for row in self.rows]
        depth = max((len(a) for a in adds), default=0)
        return [[a[k] if k < len(a) else None for a in adds] for k in range(depth)]

    def _add_vectors(self, act: Tensor, site: Site, positions: Tensor) -> Tensor:
        for slot, deltas in self._slot_deltas(site, act):
            mask = self._slot_mask(slot, positions.to(act.device))  # (batch, seq)
            act = torch.where(mask[..., None], act + deltas[:, None, :], act)
        return act

    def _slot_deltas(self, site: Site, act: Tensor) -> list[tuple[list, Tensor]]:
        key = (site, act.device, act.dtype)
        if key not in self._deltas:
            slots = []
            for slot in self._additions(site):
                deltas = torch.zeros(len(slot), act.shape[-1], device=act.device, dtype=act.dtype)
                for b, fn in enumerate(slot):
                    if fn is not None:  # scale·v cast to the activation's dtype, as AddVector does
                        deltas[b] = (fn.scale * fn.vector).to(device=act.device, dtype=act.dtype)
                slots.append((slot, deltas))
            self._deltas[key] = slots
        return self._deltas[key]

    def _slot_mask(self, slot: list, positions: Tensor) -> Tensor:
        """(batch, seq) bool: where each row's addition applies (never on rows without one)."""
        mask = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        groups: dict = {}
        for b, fn in enumerate(slot):
            if fn is not None:
                groups.setdefault(as_positions(fn.positions), []).append(b)
        plen = self.prompt_len.to(positions.device)
        for spec, rows in groups.items():
            for b in rows:  # row by row: each row's prompt has its own length and marker
                mask[b:b + 1] = spec.mask(positions[b:b + 1], plen[b:b + 1],
                                          *_prompt_args(self._row_ids(b), positions.device))
        return mask

    def _row_ids(self, b: int) -> Tensor | None:
        return None if self.prompt_ids is None else torch.as_tensor(self.prompt_ids[b])[None]

    # --- anything else, row by row -------------------------------------------------------------
    def _per_row(self, act: Tensor, site: Site, ctx, positions: Tensor) -> Tensor:
        touched = [b for b, row in enumerate(self.rows)
                   if row.get(site) and not all(_is_plain_add(f) for f in row[site])]
        if not touched:
            return act
        out = list(act.unbind(0))
        for b in touched:
            row_ctx = RowContext(site, ctx.model, positions[b:b + 1], self.prompt_len[b:b + 1],
                                 self._row_ids(b))
            row_act = act[b:b + 1]
            for fn in self.rows[b][site]:
                new = fn(row_act, row_ctx)
                row_act = row_act if new is None else new
            out[b] = row_act[0]
        return torch.stack(out)
