"""The engine behind patching grids and ablation sweeps: many small edits, several per forward pass.

A *cell* is one experiment: a set of `Target`s (site, head or neuron, position per prompt) whose
activations are overwritten with values from a *source* (the clean run's activations when
patching; zeros, means or other inputs' activations when ablating). `run_cells` replicates the
batch of prompts K times along the batch dimension and applies a different cell to each
replica, so K cells cost one forward pass. Prompts are right-padded, so a token's index in the
sequence is its absolute position; the final norm's output is read at each prompt's last token
and the rest of the forward pass (the unembedding of every position) is skipped.

Prefix reuse: in a causal model, a cell that first changes position p leaves every position
before p exactly as in the unpatched run. Cells are grouped by that first position; the
unpatched run's key/value cache of the prefix (computed once per prefix length, by the HF
model itself) is repeated for the replicas, and only the remaining tokens are run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.hooks import StopForward
from interplab.interventions import intervene
from interplab.models.handle import LoadedModel
from interplab.progress import progress_bar
from interplab.sites import Site

FINAL = "ln_final.hook_normalized"


@dataclass(frozen=True, eq=False)
class Target:
    """One thing to overwrite: a site, optionally one head/neuron, at given positions."""

    site: Site
    """Where (a canonical Site)."""
    index: int | None = None
    """Head (attn.hook_z) or neuron (mlp.hook_post); None: the whole activation."""
    positions: Int[Tensor, "batch"] | None = None
    """Token position per prompt (-1: leave that prompt alone); None: every position."""
    valid: Tensor | None = None
    """(batch, seq) bool: positions allowed to change (those with a counterpart); None: all."""


Cell = Sequence[Target]


def unembed_logits(model: LoadedModel, normalized: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits from the final norm's output: the unembedding, then the final logit soft-cap when the
    model has one (Gemma 2: cap * tanh(logits / cap)), as the HF model's forward does."""
    logits = model.unembed(normalized)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_logits(model: LoadedModel, ids: Tensor, mask: Tensor, last: Tensor,
                 fns: Mapping[str, list[Callable]] | None = None, *, grad: bool = False,
                 past=None, start: int = 0) -> Float[Tensor, "rows vocab"]:
    """Next-token logits at each row's `last` position, with `fns` attached; the forward pass stops
    after the final norm. With `grad`, the graph is kept (for attribution patching). With `past`
    (a key/value cache of the first `start` tokens), only tokens from `start` on are run."""
    stash: dict[str, Tensor] = {}

    def grab(act: Tensor, ctx) -> Tensor:
        rows = torch.arange(act.shape[0], device=act.device)
        stash["h"] = act[rows, (last - start).to(act.device)]
        raise StopForward

    hooks = {name: list(chain) for name, chain in (fns or {}).items()}
    hooks.setdefault(FINAL, []).append(grab)
    inputs = dict(input_ids=ids[:, start:].to(model.device), attention_mask=mask.to(model.device),
                  use_cache=past is not None)
    if past is not None:
        inputs[_cache_argument(model)] = past
    with torch.set_grad_enabled(grad), intervene(model, hooks):
        try:
            model.hf(**inputs)
        except StopForward:
            pass
        return unembed_logits(model, stash["h"])


def run_cells(model: LoadedModel, ids: Int[Tensor, "batch seq"], mask: Int[Tensor, "batch seq"],
              last: Int[Tensor, "batch"], sources: Mapping[Site, Tensor], cells: Sequence[Cell],
              score: Callable[[Tensor], Tensor], *, cells_per_forward: int = 16, reuse_prefix: bool = True,
              progress: bool = False, desc: str = "cells") -> Float[Tensor, "cells"]:
    """The mean score of the prompts under each cell. `sources[site]` is (batch, seq, ...): the
    value written wherever a target at that site selects. With `reuse_prefix`, tokens before a
    cell's first changed position are not recomputed (see the module docstring)."""
    if cells_per_forward < 1:
        raise ValueError(f"cells_per_forward must be >= 1, got {cells_per_forward}")
    lengths = mask.sum(-1)
    starts = [first_changed(cell, lengths) if reuse_prefix else 0 for cell in cells]
    results = torch.zeros(len(cells))
    prefixes: dict[int, object] = {}
    bar = progress_bar(progress, total=len(cells), desc=desc, unit="cell")
    try:
        for start, chunk in _chunks(starts, cells_per_forward):
            if start and start not in prefixes:
                prefixes[start] = prefix_cache(model, ids[:, :start], mask[:, :start])
            chunk_cells = [cells[i] for i in chunk]
            results[chunk] = _run_chunk(model, ids, mask, last, sources, chunk_cells, score, start,
                                        prefixes.get(start))
            bar.update(len(chunk))
    finally:
        bar.close()
    return results


def first_changed(cell: Cell, lengths: Tensor) -> int:
    """The earliest position any target of the cell writes, capped so that every prompt's last
    token is still run (0 when a target covers every position)."""
    earliest = int(lengths.min()) - 1
    for target in cell:
        if target.positions is None:
            return 0
        chosen = target.positions[target.positions >= 0]
        if len(chosen):
            earliest = min(earliest, int(chosen.min()))
    return max(earliest, 0)


def _chunks(starts: list[int], size: int):
    """(start, [cell indices]) groups: cells sharing a first changed position, at most `size` each."""
    by_start: dict[int, list[int]] = {}
    for i, start in enumerate(starts):
        by_start.setdefault(start, []).append(i)
    for start in sorted(by_start):
        members = by_start[start]
        for i in range(0, len(members), size):
            yield start, members[i:i + size]


def prefix_cache(model: LoadedModel, ids: Tensor, mask: Tensor):
    """The unpatched run's key/value cache for the first tokens (the HF model's own cache object)."""
    with torch.no_grad():
        out = model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise ValueError(f"{model.model_id} returned no repeatable key/value cache; pass reuse_prefix=False")
    return cache


def _cache_argument(model: LoadedModel) -> str:
    """The forward argument that takes a key/value cache: `cache` (transformers >= 5.2x) or
    `past_key_values` (earlier)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.hf.forward).parameters else "past_key_values"


def _run_chunk(model, ids, mask, last, sources, chunk: Sequence[Cell], score, start: int, prefix) -> Tensor:
    k, batch = len(chunk), ids.shape[0]
    fns = {}
    for site, site_mask in cell_masks(model, chunk, batch, ids.shape[1]).items():
        source = sources[site].repeat_interleave(k, dim=0)  # (batch, ...) -> (batch*k, ...), row b*k + j
        fns[site.name] = [_writer(site_mask, source)]
    past = None
    if prefix is not None:
        past = copy.deepcopy(prefix)
        past.batch_repeat_interleave(k)
    logits = final_logits(model, ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0),
                          last.repeat_interleave(k), fns, past=past, start=start)
    return score(logits).view(batch, k).mean(0)  # (batch*k,) -> (batch, k) -> mean per cell


def _writer(site_mask: Tensor, source: Tensor):
    def write(act: Tensor, ctx) -> Tensor:
        n = act.shape[1]  # the last n positions run (all of them unless a prefix was reused)
        where = site_mask[:, -n:].to(act.device)
        return torch.where(where, source[:, -n:].to(device=act.device, dtype=act.dtype), act)

    return write


def cell_masks(model: LoadedModel, cells: Sequence[Cell], batch: int, seq: int) -> dict[Site, Tensor]:
    """Per site, a bool mask over (batch * len(cells), seq, ...) broadcastable to the activation;
    row b * len(cells) + k is prompt b under cell k."""
    masks: dict[Site, Tensor] = {}
    for k, cell in enumerate(cells):
        for target in cell:
            if target.site not in masks:
                masks[target.site] = torch.zeros(len(cells) * batch, seq, *_feature_shape(model, target.site),
                                                  dtype=torch.bool)
            masks[target.site][k::len(cells)] |= target_mask(model, target, batch, seq)
    return masks


def target_mask(model: LoadedModel, target: Target, batch: int, seq: int) -> Tensor:
    """(batch, seq, *feature) bool for one target."""
    if target.positions is None:
        where = torch.ones(batch, seq, dtype=torch.bool)
    else:
        where = torch.zeros(batch, seq, dtype=torch.bool)
        rows = (target.positions >= 0).nonzero().flatten()
        where[rows, target.positions[rows]] = True
    if target.valid is not None:
        where &= target.valid[:, :seq]
    feature = torch.ones(_feature_shape(model, target.site), dtype=torch.bool)
    if target.index is not None:
        feature = torch.zeros_like(feature)
        feature[target.index] = True
    return where.view(batch, seq, *([1] * feature.dim())) & feature  # (batch, seq) -> (batch, seq, *feature)


def _feature_shape(model: LoadedModel, site: Site) -> tuple[int, ...]:
    """Mask shape after (batch, seq): per head for hook_z, per neuron for mlp.hook_post, else one."""
    if site.kind == "attn.hook_z":
        return (model.n_heads, 1)
    if site.kind == "mlp.hook_post":
        return (model.d_mlp,)
    return (1,)


def capture_run(model: LoadedModel, ids: Tensor, mask: Tensor, last: Tensor, sites: Sequence[Site]
                ) -> tuple[dict[Site, Tensor], Tensor]:
    """Activations at `sites` (batch, seq, ...) and the last-token logits of one unpatched run."""
    store: dict[Site, Tensor] = {}

    def recorder(site: Site):
        def record(act: Tensor, ctx) -> None:
            store[site] = act.detach().to("cpu")

        return record

    fns = {site.name: [recorder(site)] for site in sites}
    logits = final_logits(model, ids, mask, last, fns)
    return store, logits.cpu()
