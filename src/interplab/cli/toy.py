"""`interplab toy ...`: reproduce the toy models of superposition and grokking on a CPU.

Each command writes PNG figures, a JSON summary of the measured quantities and the
trained weights (config JSON + safetensors) into `--out`. Torch is imported inside
the command bodies so that `interplab --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from interplab.cli.options import prepare_out

app = typer.Typer(no_args_is_help=True)

_DEFAULT_SPARSITIES = [0.0, 0.7, 0.9, 0.97, 0.99, 0.997]


@app.command()
def superposition(
    out: Path = typer.Option(
        Path("runs/toy-superposition"), "--out", "-o", help="Folder for figures, summary.json and weights."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output instead of refusing."),
    n_features: int = typer.Option(5, help="n: number of sparse input features."),
    n_hidden: int = typer.Option(
        2, help="m: hidden dimensions (m >= n is allowed; then no superposition is possible)."
    ),
    sparsity: list[float] = typer.Option(
        _DEFAULT_SPARSITIES, "--sparsity",
        help="Feature sparsity S in [0, 1); repeat for several (one model instance each, trained together).",
    ),
    importance_decay: float = typer.Option(0.9, help="r: feature i has importance r^i."),
    activation: str = typer.Option("relu", help="'relu' (the ReLU output model) or 'linear' (the baseline)."),
    correlation: str = typer.Option("none", help="'none', 'correlated' or 'anticorrelated' feature pairs."),
    steps: int = typer.Option(10_000, help="AdamW steps for every experiment (paper: 10,000)."),
    batch_size: int = typer.Option(1024, help="Samples per step (paper: 1024)."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (paper: 1e-3)."),
    seed: int = typer.Option(0, help="Seed for the weights and the data."),
    heatmaps: bool = typer.Option(
        True, help="Also run the paper's n=20, m=5 ReLU vs linear comparison (W^T W, norm bars)."
    ),
    dimensionality: bool = typer.Option(True, help="Also run the dimensions-per-feature sweep over sparsity."),
    phase_diagram: bool = typer.Option(True, help="Also compute the n=2, m=1 phase diagram."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Toy models of superposition (Elhage et al. 2022): train, measure, draw."""
    from interplab.toy import superposition as sp
    from interplab.toy.experiments import run_superposition_experiments

    config = sp.SuperpositionConfig(
        n_features=n_features, n_hidden=n_hidden, sparsities=tuple(sparsity),
        importance_decay=importance_decay, activation=activation, correlation=correlation,
        steps=steps, batch_size=batch_size, lr=lr, seed=seed,
    )
    prepare_out(out, overwrite)
    summary = run_superposition_experiments(
        config, out, heatmaps=heatmaps, dimensionality=dimensionality, phase_diagram=phase_diagram,
        progress=progress,
    )
    for note in summary["main"]["notes"]:
        typer.echo(f"note: {note}")
    for row in summary["main"]["instances"]:
        typer.echo(
            f"S={row['sparsity']:<6g} represented {row['n_represented']:>3}/{n_features}  "
            f"D*={row['dimensions_per_feature']:.3f}  sum D_i={row['dimensionality_sum']:.2f}  "
            f"loss={row['loss']:.3g}"
        )
    typer.echo(f"wrote {out}/summary.json and figures in {out}/figures")


@app.command()
def grokking(
    out: Path = typer.Option(
        Path("runs/toy-grokking"), "--out", "-o", help="Folder for figures, summary.json, history and checkpoints."
    ),
    resume: bool = typer.Option(False, help="Continue the interrupted run in OUT (same settings)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output instead of refusing."),
    paper: bool = typer.Option(
        False, "--paper",
        help="Use the settings of Nanda et al. 2023 (d_model 128, d_mlp 512, lr 1e-3, up to 40k steps, "
        "stopping 3,000 after generalisation; half an hour or more on a 2-core CPU).",
    ),
    p: Optional[int] = typer.Option(None, help="Prime modulus (default 113)."),
    train_fraction: Optional[float] = typer.Option(None, help="Fraction of the p^2 pairs to train on (default 0.3)."),
    d_model: Optional[int] = typer.Option(None, help="Residual width (default 64; paper 128)."),
    n_heads: Optional[int] = typer.Option(None, help="Attention heads (default 4)."),
    d_mlp: Optional[int] = typer.Option(None, help="MLP width (default 256; paper 512)."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default 5e-3; paper 1e-3)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default 1.0)."),
    steps: Optional[int] = typer.Option(None, help="Maximum full-batch steps (default 3000; --paper 40000)."),
    stop_after: Optional[int] = typer.Option(
        None, help="Stop this many steps after test accuracy reaches 95% (default 500, --paper 3000; -1: never)."
    ),
    eval_every: Optional[int] = typer.Option(None, help="Log losses and accuracies every N steps (default 10, --paper 20)."),
    checkpoint_every: Optional[int] = typer.Option(
        None, help="Keep weights and save the training state every N steps (default 100, --paper 250)."),
    seed: Optional[int] = typer.Option(None, help="Seed for the initial weights (default 0)."),
    data_seed: Optional[int] = typer.Option(None, help="Seed for the train/test split (default 0)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Grokking on modular addition (Power et al. 2022; Nanda et al. 2023): train, detect, explain."""
    import dataclasses

    from interplab.toy import grokking as gk
    from interplab.toy.experiments import run_grokking_experiment

    base = gk.GrokkingConfig.paper() if paper else gk.GrokkingConfig()
    overrides = dict(
        p=p, train_fraction=train_fraction, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, lr=lr,
        weight_decay=weight_decay, steps=steps, eval_every=eval_every, checkpoint_every=checkpoint_every,
        seed=seed, data_seed=data_seed,
    )
    config = gk.with_overrides(base, **overrides)
    if stop_after is not None:
        config = dataclasses.replace(config, stop_after_generalisation=None if stop_after < 0 else stop_after)
    if _grokking_done_or_refused(out, resume, overwrite):
        return
    summary = run_grokking_experiment(config, out, progress=progress)
    typer.echo(
        f"memorised at step {summary['memorisation_step']}, "
        f"generalised at step {summary['generalisation_step']} "
        f"(final train acc {summary['final_train_accuracy']:.3f}, test acc {summary['final_test_accuracy']:.3f}); "
        f"key frequencies {summary['key_frequencies']} carry {summary['key_fraction']:.1%} "
        f"of the embedding norm^2; {summary['steps']} steps in {summary['seconds']:.0f} s"
    )
    typer.echo(f"wrote {out}/summary.json, figures in {out}/figures, checkpoints in {out}/checkpoints")


def _grokking_done_or_refused(out: Path, resume: bool, overwrite: bool) -> bool:
    """Apply the output rules before any work; True when a --resume finds the run finished."""
    import shutil

    from interplab.errors import UserInputError
    from interplab.toy.experiments import training_state_dir

    state = training_state_dir(out)
    if resume and overwrite:
        raise UserInputError("--resume continues the run in OUT, --overwrite replaces it: give one of them")
    if resume:
        if (out / "summary.json").is_file() and not state.exists():
            typer.echo(f"the run in {out} is finished; nothing to resume")
            return True
        return False
    prepare_out(out, overwrite)
    if state.exists():
        if not overwrite:
            raise UserInputError(f"an interrupted run is in {state}; pass --resume to continue it or --overwrite "
                                 "to start over")
        shutil.rmtree(state)
    return False
