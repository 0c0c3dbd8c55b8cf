"""Activation patching: which activations carry the difference between a clean and a corrupted run.

Denoising (default): run the corrupted prompts and write one activation from the clean run;
noising (direction="noise"): run the clean prompts and write one from the corrupted run. Either
way the grid reports the normalised metric recovery (Meng et al. 2022; Wang et al. 2022)

    recovery = (patched - corrupted) / (clean - corrupted)

so 1 means the patched run scores like the clean run and 0 like the corrupted run (when
noising, a site that matters moves the score from 1 towards 0). Metrics are averaged over the
prompts before normalising. Several cells run in one forward pass (see `cells.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.analysis.cells import Target, capture_run, run_cells
from interplab.analysis.components import Component, parse_components, parse_layers
from interplab.analysis.report import Grid
from interplab.analysis.tasks import EncodedTask, Task, position_selector, token_texts, valid_positions
from interplab.models.handle import LoadedModel, as_loaded
from interplab.sites import Site
from interplab.types import ModelLike

DIRECTIONS = ("denoise", "noise")
METHODS = ("patch", "attribution")


@dataclass
class PatchSetup:
    """Both runs of a task, ready for patching in one direction."""

    model: LoadedModel
    enc: EncodedTask
    run: str
    """The run that is patched: "corrupted" (denoise) or "clean" (noise)."""
    sources: dict[Site, Tensor]
    """The other run's activations, re-indexed to the patched run's positions."""
    run_acts: dict[Site, Tensor]
    """The patched run's own activations (for attribution patching)."""
    clean_metric: float
    corrupted_metric: float

    @property
    def ids(self) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask = self.enc.run(self.run)
        return ids, mask, self.enc.last(self.run)

    @property
    def valid(self) -> Tensor:
        return valid_positions(self.enc, self.run)

    def recovery(self, patched: Tensor) -> Tensor:
        return (patched - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    def meta(self, **extra) -> dict:
        return {"model": self.model.model_id, "task": self.enc.task.name, "metric": self.enc.task.metric,
                "n_prompts": len(self.enc), "direction": "denoise" if self.run == "corrupted" else "noise",
                "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric, **extra}


def prepare(model: ModelLike, task: Task | EncodedTask, sites: Sequence[Site], direction: str = "denoise") -> PatchSetup:
    """Encode the task, run clean and corrupted once, and keep the activations at `sites`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' (clean into corrupted) or 'noise' (corrupted into "
                         f"clean), got {direction!r}")
    model = as_loaded(model)
    enc = task if isinstance(task, EncodedTask) else _encode(model, task)
    enc.require_corrupted()
    acts, metrics = {}, {}
    for which in ("clean", "corrupted"):
        ids, mask = enc.run(which)
        acts[which], logits = capture_run(model, ids, mask, enc.last(which), sites)
        metrics[which] = float(enc.score(logits).mean())
    _check_gap(metrics, enc.task)
    run, other = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    mapping = enc.to_clean if run == "corrupted" else enc.to_corrupted
    sources = {site: _align(acts[other][site], mapping) for site in sites}
    return PatchSetup(model, enc, run, sources, acts[run], metrics["clean"], metrics["corrupted"])


def _encode(model: LoadedModel, task) -> EncodedTask:
    if not isinstance(task, Task):
        raise TypeError(f"expected a Task (e.g. ioi_task(...) or load_facts(...)), got {type(task).__name__}")
    return task.encode(model)


def _check_gap(metrics: dict[str, float], task: Task) -> None:
    gap = metrics["clean"] - metrics["corrupted"]
    if abs(gap) < 1e-6 * max(1.0, abs(metrics["clean"])):
        raise ValueError(
            f"the clean and corrupted prompts score the same {task.metric} ({metrics['clean']:.4g}), so "
            "recovery (patched - corrupted) / (clean - corrupted) is undefined; make the corruption "
            "change the answer")


def _align(source: Tensor, mapping: Tensor) -> Tensor:
    """source (batch, seq_other, ...) -> (batch, seq_run, ...) with row b, position p taken from the
    other run's position mapping[b, p] (positions without a counterpart read position 0 and are
    never written, see `valid`)."""
    rows = torch.arange(source.shape[0])[:, None]
    return source[rows, mapping.clamp(min=0)]


# --- columns: positions ----------------------------------------------------------------------

def position_columns(setup: PatchSetup, columns) -> list[tuple[str, Tensor | None]]:
    """Grid columns as (label, per-prompt position or None for all positions).

    `columns` (which tokens each column patches; not called `positions`, which in interplab is
    one token selection, while this names a set of columns):
    None: one column per absolute position p (token p of every prompt). Its label says what p
    is in every prompt: the token when all prompts have the same one there ("4 gave"), else the
    marks found there ("2 IO/S1"), else "(varies)"; "[k/n]" when only k of the n prompts are
    that long. "all": one column patching every position at once. "marks": one column per mark.
    A list of ints (absolute positions; negative counts from each prompt's end) and mark names.

    Marks are named token positions that a task records for each prompt (`Task.marks`, e.g.
    IOI's IO, S1, S2, plus "end", the last token); a mark column patches each prompt at its own
    position of that mark, so it means the same thing in every row even when templates differ.
    """
    enc, run = setup.enc, setup.run
    if columns is None:
        return [(label, torch.full((len(enc),), p)) for p, label in enumerate(position_labels(setup))]
    if columns == "all":
        return [("all", None)]
    if columns == "marks":
        columns = list(enc.marks(run))
    if isinstance(columns, (int, str)):
        columns = [columns]
    return [(str(p), position_selector(enc, run, p)) for p in columns]


def position_labels(setup: PatchSetup) -> list[str]:
    """One label per absolute position of the patched run (see `position_columns`)."""
    ids, mask = setup.enc.run(setup.run)
    tokenizer = setup.model.require_tokenizer()
    lengths = mask.sum(-1).tolist()
    marks = setup.enc.marks(setup.run)
    rows = [token_texts(tokenizer, ids[b, :n].tolist()) for b, n in enumerate(lengths)]
    labels = []
    for p in range(max(lengths)):
        present = [b for b, n in enumerate(lengths) if p < n]
        tokens = {rows[b][p] for b in present}
        names = [name for name, where in marks.items() if name != "end" and any(int(where[b]) == p for b in present)]
        if len(tokens) == 1:
            what = _clean_token(tokens.pop())
        elif names and all(any(int(marks[name][b]) == p for name in names) for b in present):
            what = "/".join(names)
        else:
            what = "(varies)"
        share = "" if len(present) == len(lengths) else f" [{len(present)}/{len(lengths)}]"
        labels.append(f"{p} {what}{share}")
    return labels


def _clean_token(token: str) -> str:
    return token.strip().replace("\n", "\\n") or repr(token)


def _grid(setup: PatchSetup, metrics: Tensor, rows: list[str], cols: list[str], title: str, **meta) -> Grid:
    metrics = metrics.view(len(rows), len(cols))  # (cells,) -> (rows, cols)
    return Grid(setup.recovery(metrics), rows, cols, title=title, value_name="recovery", raw=metrics,
                meta=setup.meta(**meta))


# --- grids -----------------------------------------------------------------------------------
# Every grid takes method="patch" (true activation patching) or "attribution" (the gradient
# approximation of Nanda 2023, see `attribution.py`); both give the same rows and columns.

def patch_sites(model: ModelLike, task, sites: Sequence[str], *, columns=None, direction: str = "denoise",
                method: str = "patch", cells_per_forward: int = 16, reuse_prefix: bool = True,
                progress: bool = False) -> Grid:
    """Recovery for patching each site (rows) at each position (columns; see `position_columns`).

    `reuse_prefix=False` runs every cell from the first token (for models whose key/value
    cache cannot be repeated; see `run_cells`)."""
    model = as_loaded(model)
    _check_estimate(method)
    site_list = [model.site(s) for s in sites]
    setup = prepare(model, task, site_list, direction)
    spec = position_columns(setup, columns)
    cells = [[Target(site, None, pos, setup.valid)] for site in site_list for _, pos in spec]
    metrics = _run(setup, cells, cells_per_forward, progress, "patch", method, reuse_prefix)
    return _grid(setup, metrics, [site_label(s) for s in site_list], [c for c, _ in spec],
                 _title(setup, method, "residual"), method=method)


def patch_residual(model: ModelLike, task, *, kind: str = "hook_resid_pre", layers=None, columns=None,
                   direction: str = "denoise", method: str = "patch", cells_per_forward: int = 16,
                   reuse_prefix: bool = True, progress: bool = False) -> Grid:
    """Layer x position grid for the residual stream (`kind`: hook_resid_pre, _mid or _post)."""
    model = as_loaded(model)
    if kind not in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
        raise ValueError(f"kind must be hook_resid_pre, hook_resid_mid or hook_resid_post, got {kind!r}")
    sites = [f"blocks.{layer}.{kind}" for layer in parse_layers(model, layers)]
    return patch_sites(model, task, sites, columns=columns, direction=direction, method=method,
                       cells_per_forward=cells_per_forward, reuse_prefix=reuse_prefix, progress=progress)


def patch_heads(model: ModelLike, task, *, layers=None, position=None, direction: str = "denoise",
                method: str = "patch", cells_per_forward: int = 16, reuse_prefix: bool = True,
                progress: bool = False) -> Grid:
    """Layer x head grid: each head's output (its slice of attn.hook_z) patched at every position,
    or at one `position` (an int or a mark name)."""
    model = as_loaded(model)
    _check_estimate(method)
    layer_list = parse_layers(model, layers)
    sites = [model.site(f"blocks.{layer}.attn.hook_z") for layer in layer_list]
    setup = prepare(model, task, sites, direction)
    pos = position_selector(setup.enc, setup.run, position)
    cells = [[Target(site, head, pos, setup.valid)] for site in sites for head in range(model.n_heads)]
    metrics = _run(setup, cells, cells_per_forward, progress, "patch heads", method, reuse_prefix)
    return _grid(setup, metrics, [f"L{layer}" for layer in layer_list], [f"H{h}" for h in range(model.n_heads)],
                 _title(setup, method, "heads"), position=position, method=method)


def patch_layers(model: ModelLike, task, *, kinds: Sequence[str] = ("hook_attn_out", "hook_mlp_out"),
                 layers=None, position=None, direction: str = "denoise", method: str = "patch",
                 cells_per_forward: int = 16, reuse_prefix: bool = True, progress: bool = False) -> Grid:
    """Kind x layer grid: each block's attention or MLP output patched (at every position, or one)."""
    model = as_loaded(model)
    _check_estimate(method)
    layer_list = parse_layers(model, layers)
    sites = [model.site(f"blocks.{layer}.{kind}") for kind in kinds for layer in layer_list]
    setup = prepare(model, task, sites, direction)
    pos = position_selector(setup.enc, setup.run, position)
    cells = [[Target(site, None, pos, setup.valid)] for site in sites]
    metrics = _run(setup, cells, cells_per_forward, progress, "patch layers", method, reuse_prefix)
    return _grid(setup, metrics, [k.replace("hook_", "") for k in kinds], [f"L{layer}" for layer in layer_list],
                 _title(setup, method, "layer outputs"), position=position, method=method)


def _title(setup: PatchSetup, method: str, what: str) -> str:
    how = "attribution patching" if method == "attribution" else f"{setup.meta()['direction']} patching"
    return f"{how} of {what}: recovery of {setup.enc.task.metric}"


def _run(setup: PatchSetup, cells, cells_per_forward: int, progress: bool, desc: str,
         method: str = "patch", reuse_prefix: bool = True) -> Tensor:
    """The patched metric of every cell: exactly (one forward per `cells_per_forward` cells) or by
    attribution patching (one forward and backward for all cells)."""
    if method == "attribution":
        from interplab.analysis.attribution import estimate_cells

        return estimate_cells(setup, cells)
    ids, mask, last = setup.ids
    return run_cells(setup.model, ids, mask, last, setup.sources, cells, setup.enc.score,
                     cells_per_forward=cells_per_forward, reuse_prefix=reuse_prefix, progress=progress,
                     desc=desc)


def _check_estimate(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be 'patch' (true activation patching) or 'attribution' (its "
                         f"gradient approximation), got {method!r}")


@dataclass(frozen=True)
class PatchScore:
    """The outcome of patching one set of components."""

    metric: float
    recovery: float
    clean_metric: float
    corrupted_metric: float


def patch_components(model: ModelLike, task, components, *, position=None, direction: str = "denoise",
                     reuse_prefix: bool = True) -> PatchScore:
    """Patch several components at once (e.g. ["embed", "L0H1", "L0.mlp"]) at every position (or one)."""
    model = as_loaded(model)
    parts: list[Component] = parse_components(model, components)
    setup = prepare(model, task, list(dict.fromkeys(c.site for c in parts)), direction)
    pos = position_selector(setup.enc, setup.run, position)
    cell = [Target(c.site, c.index, pos, setup.valid) for c in parts]
    metric = float(_run(setup, [cell], 1, False, "patch", "patch", reuse_prefix)[0])
    return PatchScore(metric, float(setup.recovery(torch.tensor(metric))), setup.clean_metric,
                      setup.corrupted_metric)


def site_label(site: Site) -> str:
    """Compact row label: L3.resid_pre, L3.attn_out, embed, ln_final."""
    if site.layer is None:
        return {"hook_embed": "embed", "ln_final.hook_normalized": "ln_final"}.get(site.kind, site.kind)
    return f"L{site.layer}.{site.kind.replace('hook_', '')}"
