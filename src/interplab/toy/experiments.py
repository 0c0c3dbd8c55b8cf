"""The paper experiments behind `interplab toy ...`: train, measure, draw, save.

Each function writes into one output folder:

    summary.json                 measured quantities (format_version 1)
    figures/*.png                the figures
    weights/<name>/config.json   + model.safetensors (superposition; one per experiment)
    config.json, model.safetensors, history.json, checkpoints/step_XXXXXX.safetensors (grokking)
"""

from __future__ import annotations

import shutil

from dataclasses import asdict, replace
from pathlib import Path

from interplab.toy import plots
from interplab.toy.artifacts import FORMAT_VERSION, run_folder, save_figure, save_tensors, write_json
from interplab.toy.grokking import (
    GrokkingConfig, embedding_frequency_norms, key_frequencies, phase_steps, progress_measures, summarize,
    train_grokking, write_run_files,
)
from interplab.toy.superposition import (
    SuperpositionConfig, SuperpositionRun, phase_diagram, report, train_superposition,
)

#: the paper's W^T W figure: n=20 features, m=5 dimensions, importance 0.7^i, three sparsities
HEATMAP_CONFIG = SuperpositionConfig(n_features=20, n_hidden=5, sparsities=(0.0, 0.7, 0.9), importance_decay=0.7)
#: dimensions per feature against 1/(1-S): uniform importance, 18 values of 1/(1-S) from 1 to 50 (geometric)
DIMENSIONALITY_CONFIG = SuperpositionConfig(
    n_features=40, n_hidden=4, importance_decay=1.0,
    sparsities=tuple(round(1 - 50 ** (-i / 17), 5) for i in range(18)),
)
#: phase-diagram grid: relative importance of feature 2 and density 1 - S (log-spaced)
PHASE_IMPORTANCES = [10 ** (-1 + 2 * i / 11) for i in range(12)]
PHASE_DENSITIES = [10 ** (-2 * i / 11) for i in range(12)]


# ----------------------------------------------------------------------------- superposition


def save_superposition_run(run: SuperpositionRun, directory: Path) -> None:
    """config.json (format_version, the config) + model.safetensors (W: instances x n x m, b)."""
    config = {"format_version": FORMAT_VERSION, "kind": "superposition", **asdict(run.config)}
    write_json(directory / "config.json", config)
    save_tensors(directory / "model.safetensors", {"W": run.W, "b": run.b})


def run_superposition_experiments(
    config: SuperpositionConfig,
    out: Path,
    *,
    heatmaps: bool = True,
    dimensionality: bool = True,
    phase_diagram: bool = True,
    progress: bool = False,
) -> dict:
    """The user's model (`config`) plus the paper's fixed-setting figures; returns the summary.
    `out` is written whole at the end (see `interplab.toy.artifacts.run_folder`)."""
    with run_folder(out) as tmp:
        return _superposition_experiments(config, tmp, heatmaps, dimensionality, phase_diagram, progress)


def _superposition_experiments(config: SuperpositionConfig, out: Path, heatmaps: bool, dimensionality: bool,
                               phase_diagram: bool, progress: bool) -> dict:
    figures = out / "figures"
    summary: dict = {"format_version": FORMAT_VERSION}
    main = train_superposition(config, progress=progress)
    summary["main"] = _finish(main, out / "weights" / "main")
    if config.n_hidden == 2:
        save_figure(plots.feature_geometry(main), figures / "feature_geometry.png")
    save_figure(plots.gram_heatmaps({config.activation: main}), figures / "wtw_main.png")
    save_figure(plots.norm_superposition_bars({config.activation: main}), figures / "norms_main.png")
    steps = dict(steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    if heatmaps:
        summary["heatmaps"] = _heatmaps(replace(HEATMAP_CONFIG, **steps), out, progress)
    if dimensionality:
        run = train_superposition(replace(DIMENSIONALITY_CONFIG, **steps), progress=progress)
        summary["dimensionality"] = _finish(run, out / "weights" / "dimensionality")
        save_figure(plots.dimensions_per_feature_plot(run), figures / "dimensions_per_feature.png")
    if phase_diagram:
        summary["phase_diagram"] = _phase_diagrams(out, config.seed, progress)
    write_json(out / "summary.json", summary)
    return summary


def _finish(run: SuperpositionRun, weights_dir: Path) -> dict:
    save_superposition_run(run, weights_dir)
    return report(run).to_dict()


def _heatmaps(config: SuperpositionConfig, out: Path, progress: bool) -> dict:
    runs = {act: train_superposition(replace(config, activation=act), progress=progress) for act in ("linear", "relu")}
    save_figure(plots.gram_heatmaps(runs), out / "figures" / "wtw_linear_vs_relu.png")
    save_figure(plots.norm_superposition_bars(runs), out / "figures" / "norms_linear_vs_relu.png")
    return {act: _finish(run, out / "weights" / f"heatmaps_{act}") for act, run in runs.items()}


def _phase_diagrams(out: Path, seed: int, progress: bool) -> dict:
    diagrams = [
        phase_diagram(relative_importances=PHASE_IMPORTANCES, densities=PHASE_DENSITIES, activation=act,
                      seed=seed, progress=progress)
        for act in ("linear", "relu")
    ]
    save_figure(plots.phase_diagram_plot(diagrams), out / "figures" / "phase_diagram.png")
    return {d.activation: asdict(d) for d in diagrams}


# ----------------------------------------------------------------------------- grokking


def run_grokking_experiment(config: GrokkingConfig, out: Path, *, progress: bool = False) -> dict:
    """Train, detect the phase steps, find key frequencies, compute progress measures, save
    (`out` is written whole at the end, see `interplab.toy.artifacts.run_folder`).

    While training, the state is saved every `checkpoint_every` steps into the sibling folder
    `training_state_dir(out)`; calling this again with the same `out` and config continues an
    interrupted run from there. The state folder is removed once `out` is written."""
    out = Path(out)
    state = training_state_dir(out)
    run = train_grokking(config, progress=progress, state_dir=state)
    norms = embedding_frequency_norms(run.model)
    keys = key_frequencies(norms)
    measures = progress_measures(run, keys)
    memorised, generalised = phase_steps(run.history)
    with run_folder(out) as tmp:
        summary = _save_grokking(run, tmp, norms, keys, measures, memorised, generalised)
    shutil.rmtree(state, ignore_errors=True)  # the finished run is in `out` now
    return summary


def training_state_dir(out: str | Path) -> Path:
    """Where an unfinished grokking run keeps its resumable state: `<out>.training` beside `out`."""
    out = Path(out)
    return out.with_name(f"{out.name}.training")


def _save_grokking(run, out: Path, norms, keys, measures, memorised, generalised) -> dict:
    write_run_files(run, out)
    summary = {"format_version": FORMAT_VERSION, **asdict(summarize(run, keys))}
    summary["progress_measures"] = asdict(measures)
    summary["frequency_norms"] = norms.tolist()
    write_json(out / "summary.json", summary)
    figures = out / "figures"
    save_figure(plots.grokking_curves(run.history, memorised, generalised), figures / "grokking_curves.png")
    save_figure(plots.embedding_fourier(norms, keys), figures / "embedding_fourier.png")
    save_figure(plots.progress_measures_plot(measures, run.history, memorised, generalised),
                figures / "progress_measures.png")
    return summary
