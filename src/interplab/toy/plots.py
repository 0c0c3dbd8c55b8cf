"""Figures for the toy models (matplotlib Figure objects, no pyplot; see `interplab.figures`).

Every function returns a matplotlib Figure; `interplab.toy.artifacts.save_figure` writes it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from interplab.figures import colormap, subplots

if TYPE_CHECKING:  # pragma: no cover
    from interplab.toy.grokking import GrokkingHistory, ProgressMeasures
    from interplab.toy.superposition import PhaseDiagram, SuperpositionRun


def _density_label(sparsity: float) -> str:
    return f"1-S = {1 - sparsity:.3g}"


# ----------------------------------------------------------------------------- superposition


def feature_geometry(run: SuperpositionRun):
    """Feature directions W_i in the 2-D hidden space, one panel per sparsity (n features, m = 2).

    Colour shows importance (yellow = most important); a dot marks each feature's tip.
    """
    from interplab.toy.superposition import importance_matrix

    W, config = run.W, run.config
    importance = importance_matrix(config)
    k = config.n_instances
    fig, axes = subplots(1, k, figsize=(2.2 * k, 2.6), squeeze=False)
    cmap = colormap("viridis")
    for idx, ax in enumerate(axes[0]):
        rel = importance[idx] / importance[idx].max().clamp_min(1e-12)
        for i in range(config.n_features):
            x, y = W[idx, i].tolist()
            color = cmap(float(rel[i]))
            ax.plot([0, x], [0, y], color=color, lw=1.5)
            ax.scatter([x], [y], color=color, s=18, zorder=3)
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_density_label(config.sparsities[idx]), fontsize=9)
    fig.suptitle(f"Feature directions W_i, n={config.n_features}, m=2 (colour: importance)", fontsize=10)
    return fig


def gram_heatmaps(runs: dict[str, SuperpositionRun]):
    """W^T W (the feature Gram matrix) beside the bias b, one column per sparsity, one row per model."""

    names = list(runs)
    k = runs[names[0]].config.n_instances
    fig, axes = subplots(len(names), 2 * k, figsize=(2.0 * k + 1, 2.2 * len(names)), squeeze=False,
                             gridspec_kw={"width_ratios": [10, 1] * k})
    for row, name in enumerate(names):
        run = runs[name]
        gram = (run.W @ run.W.transpose(1, 2)).numpy()  # (instances, n, n): W_i . W_j
        for idx in range(k):
            ax, bias_ax = axes[row, 2 * idx], axes[row, 2 * idx + 1]
            ax.imshow(gram[idx], cmap="RdBu", vmin=-1, vmax=1)
            bias_ax.imshow(run.b[idx].numpy()[:, None], cmap="RdBu", vmin=-1, vmax=1)
            for a in (ax, bias_ax):
                a.set_xticks([])
                a.set_yticks([])
            if row == 0:
                ax.set_title(_density_label(run.config.sparsities[idx]), fontsize=9)
            if idx == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("W^T W (left) and bias b (right); red < 0 < blue", fontsize=10)
    return fig


def norm_superposition_bars(runs: dict[str, SuperpositionRun]):
    """Per-feature ||W_i|| bars coloured by superposition sum_{j!=i} (W_hat_i . W_j)^2 (black: none)."""
    from interplab.toy.superposition import feature_norms, superposition_interference

    names = list(runs)
    k = runs[names[0]].config.n_instances
    fig, axes = subplots(len(names), k, figsize=(2.2 * k, 2.4 * len(names)), squeeze=False, sharex=True)
    cmap = colormap("plasma")
    for row, name in enumerate(names):
        run = runs[name]
        norms, interference = feature_norms(run.W), superposition_interference(run.W)
        n = run.config.n_features
        for idx in range(k):
            ax = axes[row, idx]
            colors = [cmap(min(1.0, float(v))) for v in interference[idx]]
            ax.barh(range(n), norms[idx].tolist(), color=colors)
            ax.invert_yaxis()
            ax.set_yticks([])
            ax.set_xlim(0, 1.3)
            if row == 0:
                ax.set_title(_density_label(run.config.sparsities[idx]), fontsize=9)
            if idx == 0:
                ax.set_ylabel(f"{name}\nfeature (importance ->)", fontsize=8)
    fig.suptitle("||W_i|| per feature; colour = superposition (dark: none, yellow: >= 1)", fontsize=10)
    return fig


def dimensions_per_feature_plot(run: SuperpositionRun):
    """D* = m / ||W||_F^2 against 1/(1-S) (line), with every feature's dimensionality D_i (dots)."""
    from interplab.toy.superposition import dimensions_per_feature, feature_dimensionality, feature_norms

    config, W = run.config, run.W
    x = [1.0 / (1.0 - s) for s in config.sparsities]
    d_star = dimensions_per_feature(W).tolist()
    dims, norms = feature_dimensionality(W), feature_norms(W)
    fig, ax = subplots(figsize=(7, 4))
    for idx, xi in enumerate(x):
        kept = dims[idx][norms[idx] > 0.5].tolist()
        jitter = [xi * math.exp(0.04 * ((j % 5) - 2)) for j in range(len(kept))]
        ax.scatter(jitter, kept, s=6, color="tab:blue", alpha=0.25, lw=0)
    ax.plot(x, d_star, color="black", lw=2, marker="o", ms=3, label="dimensions per feature D* = m/||W||_F^2")
    for value, label in [(1.0, "1"), (3 / 4, "3/4"), (2 / 3, "2/3"), (1 / 2, "1/2"), (2 / 5, "2/5"), (1 / 3, "1/3")]:
        ax.axhline(value, color="gray", lw=0.6, ls=":")
        ax.text(x[-1] * 1.08, value, label, va="center", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("1 / (1 - S)  (inverse feature density)")
    ax.set_ylabel("dimensions per feature")
    ax.set_title(f"n={config.n_features}, m={config.n_hidden}; dots: feature dimensionality D_i", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def phase_diagram_plot(diagrams: list[PhaseDiagram]):
    """Which phase feature 2 is in, over density (x, log) and relative importance (y, log)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from interplab.toy.superposition import PHASES

    colors = ["#f0f0f0", "#4c72b0", "#dd8452"]
    fig, axes = subplots(1, len(diagrams), figsize=(4.2 * len(diagrams), 3.8), squeeze=False)
    for ax, diagram in zip(axes[0], diagrams):
        d, r = diagram.density, diagram.relative_importance
        ax.pcolormesh(_edges(d), _edges(r), diagram.phase, cmap=ListedColormap(colors), vmin=-0.5, vmax=2.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()  # dense on the left, sparse on the right, as in the paper
        ax.set_xlabel("feature density 1 - S")
        ax.set_ylabel("relative importance of feature 2")
        ax.set_title(f"{diagram.activation} output model, n=2, m=1", fontsize=10)
    handles = [Patch(color=c, label=f"feature 2: {p}") for c, p in zip(colors, PHASES)]
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.24)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def _edges(values: list[float]) -> list[float]:
    """Cell edges for pcolormesh on a log grid (geometric midpoints)."""
    logs = [math.log(v) for v in values]
    mids = [(a + b) / 2 for a, b in zip(logs, logs[1:])]
    first, last = 2 * logs[0] - mids[0], 2 * logs[-1] - mids[-1]
    return [math.exp(v) for v in [first, *mids, last]]


# ----------------------------------------------------------------------------- grokking


def grokking_curves(history: GrokkingHistory, memorisation_step: int | None, generalisation_step: int | None):
    """Train / test loss and accuracy (log scales) and the total weight norm, with phase markers."""

    fig, (loss_ax, acc_ax, norm_ax) = subplots(1, 3, figsize=(14, 3.8))
    steps = [max(s, 1) for s in history.step]
    loss_ax.plot(steps, history.train_loss, label="train")
    loss_ax.plot(steps, history.test_loss, label="test")
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("cross-entropy loss")
    acc_ax.plot(steps, history.train_accuracy, label="train")
    acc_ax.plot(steps, history.test_accuracy, label="test")
    acc_ax.set_ylabel("accuracy")
    norm_ax.plot(steps, history.weight_norm, color="black")
    norm_ax.set_ylabel("total weight norm")
    for ax in (loss_ax, acc_ax, norm_ax):
        ax.set_xscale("log")
        ax.set_xlabel("step")
        _phase_lines(ax, memorisation_step, generalisation_step)
    loss_ax.legend(fontsize=8)
    acc_ax.legend(fontsize=8, loc="center left")
    fig.suptitle("Grokking: memorisation first, generalisation much later", fontsize=10)
    fig.tight_layout()
    return fig


def _phase_lines(ax, memorisation_step: int | None, generalisation_step: int | None) -> None:
    if memorisation_step is not None:
        ax.axvline(max(memorisation_step, 1), color="tab:blue", ls="--", lw=0.8, label="memorised")
    if generalisation_step is not None:
        ax.axvline(max(generalisation_step, 1), color="tab:orange", ls="--", lw=0.8, label="generalised")


def embedding_fourier(norms, keys: list[int]):
    """Squared norm of the embedding carried by each frequency k, key frequencies highlighted."""

    values = norms.tolist()
    total = sum(values)
    fig, ax = subplots(figsize=(8, 3))
    colors = ["tab:red" if k + 1 in keys else "tab:gray" for k in range(len(values))]
    ax.bar(range(1, len(values) + 1), [v / total for v in values], color=colors)
    ax.set_xlabel("frequency k (w = 2 pi k / p)")
    ax.set_ylabel("share of embedding norm^2")
    ax.set_title(f"Fourier spectrum of the token embedding; key frequencies {keys} in red", fontsize=10)
    return fig


def progress_measures_plot(measures: ProgressMeasures, history: GrokkingHistory,
                           memorisation_step: int | None, generalisation_step: int | None):
    """Restricted and excluded loss beside train/test loss, and the key-frequency norm fraction."""

    fig, (loss_ax, frac_ax) = subplots(1, 2, figsize=(12, 3.8))
    steps = [max(s, 1) for s in measures.step]
    loss_ax.plot([max(s, 1) for s in history.step], history.train_loss, label="train loss", lw=1)
    loss_ax.plot([max(s, 1) for s in history.step], history.test_loss, label="test loss", lw=1)
    loss_ax.plot(steps, measures.restricted_loss, label="restricted loss (key freqs only)", lw=2)
    loss_ax.plot(steps, measures.excluded_loss, label="excluded loss (key freqs removed)", lw=2)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.legend(fontsize=8)
    frac_ax.plot(steps, measures.key_fraction, color="tab:red")
    frac_ax.set_ylim(0, 1.02)
    frac_ax.set_ylabel("key frequencies' share of ||W_E||^2")
    for ax in (loss_ax, frac_ax):
        ax.set_xlabel("step")
        _phase_lines(ax, memorisation_step, generalisation_step)
    fig.suptitle("Progress measures (Nanda et al. 2023) move before test accuracy does", fontsize=10)
    fig.tight_layout()
    return fig
