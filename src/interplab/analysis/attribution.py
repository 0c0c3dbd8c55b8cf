"""Attribution patching: a first-order estimate of every patching cell from one backward pass.

Patching activation a (patched run) with a' (the other run) changes the metric M by about

    M(a') - M(a)  ~  (a' - a) . dM/da          (Nanda 2023, "Attribution Patching";
                                               Syed et al. 2023, "Attribution Patching
                                               Outperforms Automated Circuit Discovery")

so one forward and one backward pass on the patched run, plus the other run's cached
activations, estimate a whole grid. The estimate is exact when M is linear in a (e.g. the
logit difference in the final norm's output) and drifts where the model is far from linear
between the two runs (large patches, early residual positions, attention patterns flipping):
compare against true patching (`compare_grids`, `interplab attribute --compare`) before
trusting it on a new task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from interplab.analysis.cells import final_logits, target_mask
from interplab.analysis.report import Grid
from interplab.models.handle import LoadedModel
from interplab.sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from interplab.analysis.patching import PatchSetup


def activation_gradients(model: LoadedModel, ids: Tensor, mask: Tensor, last: Tensor, sites: Sequence[Site],
                         score: Callable[[Tensor], Tensor]) -> tuple[dict[Site, Tensor], dict[Site, Tensor], float]:
    """Activations at `sites`, the gradient of the mean score with respect to each, and the score.

    Each site's activation is replaced by a copy that keeps its place in the autograd graph, so the
    gradient of a site includes every path through later sites. `torch.autograd.grad` is used,
    so the model's parameters' `.grad` are never touched.
    """
    stash: dict[Site, Tensor] = {}

    def keeper(site: Site):
        def keep(act: Tensor, ctx) -> Tensor:
            copy = act.clone() if act.requires_grad else act.detach().clone().requires_grad_(True)
            stash[site] = copy
            return copy

        return keep

    fns = {site.name: [keeper(site)] for site in sites}
    logits = final_logits(model, ids, mask, last, fns, grad=True)
    metric = score(logits).mean()
    tensors = [stash[site] for site in sites]
    grads = torch.autograd.grad(metric, tensors, allow_unused=True)
    grads = {site: (torch.zeros_like(t) if g is None else g).detach().cpu() for site, t, g in zip(sites, tensors, grads)}
    acts = {site: stash[site].detach().cpu() for site in sites}
    return acts, grads, metric.item()


def estimate_cells(setup: "PatchSetup", cells: Sequence[Sequence]) -> Tensor:
    """Estimated patched metric of each cell: M(run) + sum over its targets of (source - act) . grad."""
    sites = list(dict.fromkeys(target.site for cell in cells for target in cell))
    ids, mask, last = setup.ids
    acts, grads, metric = activation_gradients(setup.model, ids, mask, last, sites, setup.enc.score)
    deltas = {site: (setup.sources[site] - acts[site]) * grads[site] for site in sites}  # (batch, seq, ...)
    batch, seq = ids.shape
    estimates = []
    for cell in cells:
        total = sum(float((deltas[t.site] * target_mask(setup.model, t, batch, seq)).sum()) for t in cell)
        estimates.append(metric + total)
    return torch.tensor(estimates)


def compare_grids(exact: Grid, approx: Grid) -> dict[str, float]:
    """How well attribution patching tracks true patching on the same grid: Pearson correlation,
    mean and max absolute error, and the share of cells whose sign agrees (cells with |true| > 0.05)."""
    if exact.values.shape != approx.values.shape:
        raise ValueError(f"grids differ in shape: {tuple(exact.values.shape)} vs {tuple(approx.values.shape)}")
    x, y = exact.values.flatten().double(), approx.values.flatten().double()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        raise ValueError("need at least two finite cells to compare grids")
    xc, yc = x - x.mean(), y - y.mean()
    denom = float(xc.norm() * yc.norm())
    big = x.abs() > 0.05
    return {
        "pearson": float((xc * yc).sum()) / denom if denom > 0 else float("nan"),
        "mean_abs_error": float((x - y).abs().mean()),
        "max_abs_error": float((x - y).abs().max()),
        "sign_agreement": float((torch.sign(x[big]) == torch.sign(y[big])).double().mean()) if big.any() else float("nan"),
        "n_cells": int(len(x)),
    }

