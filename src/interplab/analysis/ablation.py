"""Ablation: remove a part of the network and see how a task's metric changes.

Three ways to remove an activation (Wang et al. 2022; Chan et al. 2022, causal scrubbing):

    zero      set it to 0
    mean      set it to its mean over a reference dataset, over all positions, or with
              `per_position` at each absolute position
    resample  set it to its value on another input of the dataset, position by position

Parts are heads (their slice of attn.hook_z), MLP neurons (mlp.hook_post), whole attention or
MLP outputs, any site, and directions in a site's activation space (`Direction`: only the
component along the direction is removed). `ablate(...)` is a context manager for any set of
parts; `ablation_sweep(...)` ablates every head and every MLP one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.analysis.cells import Target, capture_run, final_logits, run_cells
from interplab.analysis.components import Component, parse_component, parse_layers
from interplab.analysis.report import Grid
from interplab.analysis.tasks import EncodedTask, Task
from interplab.cache import ActivationCache, capture
from interplab.devices import Copies
from interplab.errors import UserInputError
from interplab.interventions import (Intervention, InterventionHandle, as_vector, check_vector, intervene,
                                     mean_ablate, project_out, resample_ablate, zero_ablate)
from interplab.models.handle import LoadedModel, as_loaded
from interplab.positions import Positions
from interplab.sites import Site
from interplab.types import ModelLike, PositionsLike

METHODS = ("zero", "mean", "resample")


@dataclass(frozen=True, eq=False)
class Direction:
    """A direction in one site's activation space (e.g. a feature's decoder row); ablating it
    changes only the component of the activation along the direction."""

    site: str
    """Where the direction lives, e.g. "blocks.6.hook_resid_post"."""
    vector: Tensor
    """The direction (d_model,); only its direction matters."""
    label: str = "direction"
    """Name for reports."""


def ablate(model: ModelLike, components, *, method: str = "zero", reference=None, per_position: bool = False,
           positions: PositionsLike = None, seed: int = 0) -> InterventionHandle:
    """Ablate several parts at once while the `with` block runs.

        with ablate(model, ["L9H6", "L10H0", "L3.mlp"], method="mean", reference=texts):
            ...

    `components`: short names (see `interplab.analysis.components`), `Component`s or `Direction`s.
    `reference` (mean and resample): texts, token ids, a Task (its clean prompts) or an
    ActivationCache holding the sites. `positions` limits the ablation to some token positions.
    """
    model = as_loaded(model)
    _check_method(method, reference)
    parts = _parse_parts(model, components)
    sites = list(dict.fromkeys(_site_of(model, p) for p in parts))
    cache = None if method == "zero" else reference_cache(model, reference, sites)
    interventions: dict[str, list] = {}
    for site, items in _group(model, parts).items():
        interventions.setdefault(site.name, []).extend(
            _interventions(site, items, method, cache, per_position, positions, seed))
    return intervene(model, interventions)


def _check_method(method: str, reference) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "zero" and reference is None:
        raise ValueError(f"{method} ablation needs a reference dataset: pass reference=texts (or a Task, "
                         "token ids, or an ActivationCache)")


def _parse_parts(model: LoadedModel, components) -> list:
    items = [components] if isinstance(components, (str, Component, Direction)) else list(components)
    if not items:
        raise ValueError("no components given: name at least one, e.g. 'L3H5' or 'L3.mlp'")
    return [c if isinstance(c, Direction) else parse_component(model, c) for c in items]


def _site_of(model: LoadedModel, part) -> Site:
    return model.site(part.site) if isinstance(part, Direction) else part.site


def _group(model: LoadedModel, parts: list) -> dict[Site, list]:
    grouped: dict[Site, list] = {}
    for part in parts:
        grouped.setdefault(_site_of(model, part), []).append(part)
    return grouped


def _interventions(site: Site, items: list, method: str, cache, per_position: bool, positions, seed: int) -> list:
    out = [project_out(d.vector, positions=positions) if method == "zero"
           else DirectionAblate(d.vector, method, cache, per_position, positions, seed)
           for d in items if isinstance(d, Direction)]
    comps = [c for c in items if isinstance(c, Component)]
    if comps:
        whole = any(c.index is None for c in comps)
        index = None if whole else tuple(sorted({c.index for c in comps}))
        if method == "zero":
            out.append(zero_ablate(index=index, positions=positions))
        elif method == "mean":
            out.append(mean_ablate(cache, index=index, positions=positions, per_position=per_position))
        else:
            out.append(resample_ablate(cache, index=index, positions=positions, seed=seed))
    return out


def reference_cache(model: LoadedModel, reference, sites: Sequence[Site]) -> ActivationCache:
    """Activations of the reference dataset at `sites` (right-padded)."""
    if isinstance(reference, ActivationCache):
        missing = [s.name for s in sites if s.name not in reference.activations]
        if missing:
            raise ValueError(f"the reference cache lacks {missing}; capture them too")
        return reference
    if isinstance(reference, Task):
        reference = list(reference.clean)
    return capture(model, [s.name for s in sites], reference, padding_side="right", device="cpu")


@dataclass(frozen=True, eq=False)
class DirectionAblate(Intervention):
    """x <- x + (t - x.u) u with u = d/|d|: only the component along u changes, to the reference
    mean of x.u (mean; per position with `per_position`) or x.u of a random reference row at the
    same position (resample). Zero direction-ablation is `project_out`."""

    direction: object  # a tensor once built
    method: str
    reference: ActivationCache
    per_position: bool = False
    positions: PositionsLike = None  # a Positions value once built
    seed: int = 0

    def _check(self):
        if self.method not in ("mean", "resample"):
            raise UserInputError(f"direction ablation method must be 'mean' or 'resample' here "
                                 f"(zero is project_out), got {self.method!r}")
        object.__setattr__(self, "direction", as_vector(self.direction, "direction"))

    def _bind(self, site: Site, model: LoadedModel):
        direction = check_vector(self.direction, site, model, "direction")
        if float(direction.norm()) == 0:
            raise UserInputError(f"the direction for {site.name} is the zero vector; it points nowhere")
        unit = direction / direction.norm()
        proj = self.reference.by_position(site.name).float() @ unit.float()  # (rows, seq, d) -> (rows, seq)
        targets = _DirectionTargets(proj, self.reference.position_mask, self.method, self.per_position,
                                    torch.Generator().manual_seed(self.seed))
        positions, copies = self.positions, Copies()

        def ablate_direction(act: Tensor, ctx) -> Tensor:
            u = copies.like(unit, act)
            target = targets(act, ctx).to(device=act.device, dtype=act.dtype)
            new = act + (target - act @ u)[..., None] * u
            return torch.where(ctx.mask(act, positions)[..., None], new, act)

        return ablate_direction


@dataclass
class _DirectionTargets:
    """The value x.u is set to, per (row, position) of a run."""

    proj: Tensor  # (rows, seq): reference x.u by absolute position
    mask: Tensor  # (rows, seq): real reference tokens
    method: str
    per_position: bool
    generator: torch.Generator

    def __call__(self, act: Tensor, ctx) -> Tensor:
        positions = ctx.positions(act).cpu()
        if positions.max() >= self.proj.shape[1]:
            raise UserInputError(f"the reference covers {self.proj.shape[1]} positions but the run reached "
                                 f"position {int(positions.max())}; use longer reference inputs")
        weights = self.mask.float()
        if self.method == "mean" and not self.per_position:
            return ((self.proj * weights).sum() / weights.sum()).expand(act.shape[:2])
        if self.method == "mean":
            means = (self.proj * weights).sum(0) / weights.sum(0).clamp_min(1)  # (seq,)
            return means[positions.clamp(min=0)]
        rows = torch.randint(self.proj.shape[0], (act.shape[0],), generator=self.generator)
        return self.proj[rows[:, None], positions.clamp(min=0)]


# --- sweep ------------------------------------------------------------------------------------

def ablation_sweep(model: ModelLike, task: Task | EncodedTask, *, method: str = "mean", layers=None, heads: bool = True,
                   mlps: bool = True, reference=None, per_position: bool = False, seed: int = 0,
                   cells_per_forward: int = 16, reuse_prefix: bool = True, progress: bool = False) -> Grid:
    """Ablate every head (and every layer's MLP output) one at a time on the task's clean prompts.

    Returns a layer x (H0..Hn, mlp) grid of the metric's change, ablated - unablated (negative:
    the part helps the behaviour); `raw` holds the ablated metric. The reference for mean and
    resample ablation defaults to the task's own clean prompts; resampling gives each prompt the
    activations of another prompt at least as long (one draw per prompt, seeded).
    """
    model = as_loaded(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (heads or mlps):
        raise ValueError("nothing to sweep: keep heads=True or mlps=True")
    enc = task if isinstance(task, EncodedTask) else task.encode(model)
    layer_list = parse_layers(model, layers)
    sites = _sweep_sites(model, layer_list, heads, mlps)
    ids, mask, last = enc.clean_ids, enc.clean_mask, enc.last("clean")
    acts, logits = capture_run(model, ids, mask, last, sites)
    baseline = float(enc.score(logits).mean())
    sources = _replacements(model, method, acts, enc, reference, per_position, seed, sites)
    cells, cols = _sweep_cells(model, layer_list, heads, mlps)
    ablated = run_cells(model, ids, mask, last, sources, cells, enc.score, cells_per_forward=cells_per_forward,
                        reuse_prefix=reuse_prefix, progress=progress, desc=f"{method}-ablate").view(len(layer_list), len(cols))
    meta = {"model": model.model_id, "task": enc.task.name, "metric": enc.task.metric, "method": method,
            "per_position": per_position, "baseline_metric": baseline, "n_prompts": len(enc)}
    return Grid(ablated - baseline, [f"L{layer}" for layer in layer_list], cols,
                title=f"{method} ablation: change in {enc.task.metric} (baseline {baseline:.3g})",
                value_name=f"change in {enc.task.metric}", raw=ablated, meta=meta)


def _sweep_sites(model: LoadedModel, layers: list[int], heads: bool, mlps: bool) -> list[Site]:
    sites = []
    for layer in layers:
        if heads:
            sites.append(model.site(f"blocks.{layer}.attn.hook_z"))
        if mlps:
            sites.append(model.site(f"blocks.{layer}.hook_mlp_out"))
    return sites


def _sweep_cells(model: LoadedModel, layers: list[int], heads: bool, mlps: bool):
    cols = ([f"H{h}" for h in range(model.n_heads)] if heads else []) + (["mlp"] if mlps else [])
    cells = []
    for layer in layers:
        if heads:
            z = model.site(f"blocks.{layer}.attn.hook_z")
            cells += [[Target(z, head)] for head in range(model.n_heads)]
        if mlps:
            cells.append([Target(model.site(f"blocks.{layer}.hook_mlp_out"))])
    return cells, cols


def _replacements(model: LoadedModel, method: str, acts: dict[Site, Tensor], enc: EncodedTask, reference,
                  per_position: bool, seed: int, sites: list[Site]) -> dict[Site, Tensor]:
    """Per site, the (batch, seq, ...) values written when a part there is ablated."""
    if method == "zero":
        return {site: torch.zeros_like(acts[site]) for site in sites}
    cache = reference_cache(model, reference if reference is not None else enc.task, sites)
    seq = enc.clean_ids.shape[1]
    if method == "mean":
        return {site: _mean_source(cache, site, acts[site], per_position) for site in sites}
    rows = _resample_rows(enc.clean_mask.sum(-1), cache.position_mask.sum(-1), seed,
                          same_set=reference is None)
    return {site: cache.by_position(site.name)[rows][:, :seq] for site in sites}  # (batch, seq, ...)


def _mean_source(cache: ActivationCache, site: Site, like: Tensor, per_position: bool) -> Tensor:
    source, mask = cache.by_position(site.name), cache.position_mask
    weights = mask.to(source.dtype).view(*mask.shape, *([1] * (source.dim() - 2)))  # (rows, seq) -> (rows, seq, 1..)
    if not per_position:
        return ((source * weights).sum((0, 1)) / weights.sum((0, 1))).expand_as(like)
    counts = weights.sum(0)
    seq = like.shape[1]
    if counts.shape[0] < seq or (counts[:seq] == 0).any():
        raise ValueError(f"per-position mean ablation needs reference inputs at least {seq} tokens long "
                         "(as long as the task's prompts)")
    means = (source * weights).sum(0) / counts.clamp_min(1)  # (seq_ref, ...)
    return means[:seq].expand_as(like)


def _resample_rows(lengths: Tensor, ref_lengths: Tensor, seed: int, same_set: bool) -> Tensor:
    """For each prompt, a random reference row at least as long (not itself when the reference is
    the task's own prompts)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, length in enumerate(lengths.tolist()):
        fits = (ref_lengths >= length).nonzero().flatten()
        if same_set:
            fits = fits[fits != i]
        if len(fits) == 0:
            raise ValueError(f"resample ablation found no other reference input at least {length} tokens "
                             f"long for prompt {i}; give a reference with more (or longer) prompts")
        rows.append(int(fits[torch.randint(len(fits), (1,), generator=generator)]))
    return torch.tensor(rows)


def sweep_summary(grid: Grid, k: int = 10) -> list[str]:
    """Lines naming the k parts whose ablation lowers the metric most, e.g. "L12H3  -1.23 (-34%)"."""
    baseline = grid.meta.get("baseline_metric", float("nan"))
    lines = []
    for row, col, value in grid.top(k, largest=False):
        if value >= 0:
            break
        name = f"{row}{col}" if col.startswith("H") else f"{row}.{col}"
        share = f" ({100 * value / abs(baseline):+.0f}%)" if baseline == baseline and baseline else ""
        lines.append(f"{name:10s} {value:+.4f}{share}")
    return lines


def ablated_metric(model: ModelLike, task: Task | EncodedTask, components, *, method: str = "zero", reference=None,
                   per_position: bool = False, seed: int = 0) -> float:
    """The task's mean metric on its clean prompts with `components` ablated together."""
    model = as_loaded(model)
    enc = task if isinstance(task, EncodedTask) else task.encode(model)
    with ablate(model, components, method=method, reference=reference if reference is not None else enc.task,
                per_position=per_position, seed=seed):
        logits = final_logits(model, enc.clean_ids, enc.clean_mask, enc.last("clean"))
    return float(enc.score(logits).mean())

