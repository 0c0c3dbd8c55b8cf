"""`interplab demo`, `interplab steer` and the `interplab vector ...` group.

Heavy modules (torch, transformers, interplab.steering) are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from interplab.cli.core import load_model
from interplab.cli.options import (
    DEFAULT_MODEL, MAX_NEW_TOKENS, POSITIONS, ArtifactModelOpt, ChatOpt, MaxNewTokensOpt, ModelOpt, OverwriteOpt,
    PositionsOpt, ScaleOpt, ScalesOpt, SeedOpt, check_choice, check_layers_early, check_positive, parse_layers,
    parse_numbers, prepare_out,
)
from interplab.errors import UserInputError

vector_app = typer.Typer(no_args_is_help=True, help="Build, evaluate and convert steering vectors.")

LayersOpt = Annotated[Optional[str], typer.Option(
    "--layers", "-l", help="Block indices: '6,10,14', a range '4-12', or 'all'. [default: all, or the vector's layers]",
    show_default=False)]
POSITION_MODES = ("all", "caa", "caa_tail", "actadd")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("demo")(demo)
    app.command("steer")(steer)
    app.add_typer(vector_app, name="vector")


# --- demo / steer -----------------------------------------------------------------------------

def demo(
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[int, typer.Option("--layers", "-l", help="The block whose output is steered.")] = 7,
    scales: ScalesOpt = "2,3,4,-3",
    max_new_tokens: MaxNewTokensOpt = 20,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Also save the 'cold minus hot' vector into this folder.", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Continue "The weather in California is", then steer it towards cold.

    Raw text, no chat template; about 15 s of CPU time after the first load."""
    from interplab.steering.demo import run_demo

    scale_values = parse_numbers(scales, "scale")
    check_positive(max_new_tokens, "--max-new-tokens")
    check_layers_early(str(layers), model)
    if out is not None:
        prepare_out(out, overwrite)
    handle = load_model(model)
    parse_layers(str(layers), handle.n_layers)
    result = run_demo(handle, layer=layers, scales=scale_values, max_new_tokens=max_new_tokens, out=typer.echo)
    if out is not None:
        result.vector.save(out)
        typer.echo(f"saved the vector to {out}")


def steer(
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.", show_default=False)],
    vector: Annotated[Path, typer.Option("--vector", "-v", help="A vector folder (or a .gguf control vector).",
                                         show_default=False)],
    scale: ScaleOpt = 4.0,
    layers: LayersOpt = None,
    model: ArtifactModelOpt = None,
    positions: PositionsOpt = POSITIONS,
    norm_preserving: Annotated[bool, typer.Option(help="Keep each steered residual's norm.")] = False,
    chat: ChatOpt = None,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    compare: Annotated[bool, typer.Option(help="Also print the unsteered continuation (same seed).")] = False,
    seed: SeedOpt = 0,
) -> None:
    """Continue a prompt with a steering vector added."""
    from interplab.generation import generate

    _check_finite(scale, "--scale")
    check_choice(positions, "--positions", POSITION_MODES)
    check_positive(max_new_tokens, "--max-new-tokens")
    if not prompt.strip():
        raise UserInputError("the prompt is empty: give the text to continue")
    vec = _read_vector(vector)
    name = model or vec.model_id or DEFAULT_MODEL
    check_layers_early(layers, name)
    handle = load_model(name)
    chosen = parse_layers(layers, handle.n_layers) if layers else None
    kwargs = dict(max_new_tokens=max_new_tokens, chat=chat, seed=seed)
    if compare:
        typer.echo(f"[baseline] {generate(handle, prompt, **kwargs)[0]}")
    with vec.apply(handle, layers=chosen, scale=scale, positions=positions, norm_preserving=norm_preserving):
        typer.echo(f"[steered x{scale:g}] {generate(handle, prompt, **kwargs)[0]}")


# --- vector group -----------------------------------------------------------------------------

@vector_app.command("extract")
def extract(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the vector into.", show_default=False)],
    pairs: Annotated[Optional[Path], typer.Option(help="Contrast pairs: CAA A/B .json or .jsonl.",
                                                  show_default=False)] = None,
    caa: Annotated[Optional[str], typer.Option(help="A CAA behaviour from the shared data, e.g. 'refusal' "
                                                    "(generate split).", show_default=False)] = None,
    positive: Annotated[Optional[str], typer.Option(help="ActAdd: the positive prompt, e.g. 'Love'.",
                                                    show_default=False)] = None,
    negative: Annotated[Optional[str], typer.Option(help="ActAdd: the negative prompt, e.g. 'Hate'.",
                                                    show_default=False)] = None,
    model: ModelOpt = DEFAULT_MODEL,
    layers: LayersOpt = None,
    method: Annotated[str, typer.Option(help="mean_diff, pca_diff, pca_center or logistic.")] = "mean_diff",
    read: Annotated[str, typer.Option(help="auto, answer (A/B letter), last or mean (over the completion).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Pairs per forward pass.")] = 16,
    holdout: Annotated[float, typer.Option(help="Share of pairs held out for the per-layer report.")] = 0.2,
    n_pairs: Annotated[Optional[int], typer.Option(help="Use only the first N pairs. [default: all]",
                                                   show_default=False)] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Drop A/B items whose answers are not (A)/(B).")] = False,
    chat: ChatOpt = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Build a steering vector from contrast pairs (or an ActAdd prompt pair) and save it."""
    from interplab.steering.evaluate import write_rows
    from interplab.steering.extract import extract_vector

    check_choice(method, "--method", ("mean_diff", "pca_diff", "pca_center", "logistic"))
    check_choice(read, "--read", ("auto", "answer", "last", "mean"))
    check_positive(batch_size, "--batch-size")
    dataset = _dataset(pairs, caa, positive, negative, n_pairs, skip_invalid)
    check_layers_early(layers, model)
    prepare_out(out, overwrite)
    handle = load_model(model)
    chosen = parse_layers(layers, handle.n_layers) if layers else None
    typer.echo(f"{len(dataset)} pairs ({dataset.kind}) from {dataset.source}")
    result = extract_vector(handle, dataset, layers=chosen, method=method, read=read,
                            batch_size=batch_size, holdout=holdout, seed=seed, chat=chat, progress=True)
    result.vector.save(out)
    typer.echo(f"saved {result.vector!r} to {out}")
    if result.report:
        write_rows(result.report, out, "report")
        _plot_report(result.report, out / "report.png")
        _print_report(result)


@vector_app.command("eval")
def evaluate(
    vector: Annotated[Path, typer.Argument(help="A vector folder.", show_default=False)],
    test: Annotated[Optional[Path], typer.Option(help="Held-out A/B items (CAA JSON).", show_default=False)] = None,
    caa: Annotated[Optional[str], typer.Option(help="Use the CAA test split of this behaviour, e.g. 'refusal'.",
                                               show_default=False)] = None,
    scales: ScalesOpt = "-2,-1,0,1,2",
    layers: LayersOpt = None,
    model: ArtifactModelOpt = None,
    positions: PositionsOpt = POSITIONS,
    damage_check: Annotated[bool, typer.Option("--damage/--no-damage", help="Measure the cost on neutral text.")] = True,
    prompt: Annotated[Optional[list[str]], typer.Option(help="Open-ended prompt(s) for side-by-side generations.",
                                                        show_default=False)] = None,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    n_items: Annotated[Optional[int], typer.Option(help="Use only the first N test items. [default: all]",
                                                   show_default=False)] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Drop A/B items whose answers are not (A)/(B).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Items per forward pass.")] = 16,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results folder. [default: VECTOR/eval]",
                                                show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """A/B score sweep (layer x scale), damage on neutral text, open-ended samples.

    The A/B sweep over 50 items and 5 scales at one layer takes a few minutes on a CPU."""
    from interplab.steering import evaluate as ev

    scale_values = parse_numbers(scales, "scale")
    check_choice(positions, "--positions", POSITION_MODES)
    check_positive(max_new_tokens, "--max-new-tokens")
    check_positive(batch_size, "--batch-size")
    vec = _read_vector(vector)
    dataset = None
    if test is not None or caa is not None:
        dataset = _dataset(test, caa, None, None, n_items, skip_invalid, split="test")
    name = model or vec.model_id or DEFAULT_MODEL
    check_layers_early(layers, name)
    out = prepare_out(out or vector / "eval", overwrite)
    handle = load_model(name)
    chosen = parse_layers(layers, handle.n_layers) if layers else None
    if dataset is not None:
        rows = ev.ab_sweep(handle, vec, dataset, layers=chosen, scales=scale_values, positions=positions,
                           batch_size=batch_size, progress=True)
        ev.write_rows(rows, out, "ab_sweep")
        ev.plot_sweep(rows, out / "ab_sweep.png", title=f"A/B score ({Path(dataset.source).parent.name or 'test'})")
        ev.plot_heatmap(rows, out / "ab_heatmap.png")
        _print_sweep(rows)
    if damage_check:
        rows = ev.damage(handle, vec, layers=chosen, scales=scale_values, progress=True)
        ev.write_rows(rows, out, "damage")
        ev.plot_damage(rows, out / "damage.png")
        for r in rows:
            typer.echo(f"damage  layer {r.layer:>2}  x{r.scale:+g}: ΔCE {r.delta_ce:+.3f} nats, KL {r.kl:.3f}")
    if prompt:
        layer = (chosen or vec.layers)[0]
        gens = ev.side_by_side(handle, vec, prompt, layer=layer, scales=[m for m in scale_values if m != 0],
                               max_new_tokens=max_new_tokens, positions=positions)
        ev.write_json(out / "generations.json", gens)
        for g in gens:
            typer.echo(f"[layer {g['layer']} x{g['scale']:+g}] {g['prompt']!r} -> {g['text']!r}")
    typer.echo(f"results in {out}")


@vector_app.command("export-gguf")
def export_gguf(
    vector: Annotated[Path, typer.Argument(help="A vector folder.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file to write.", show_default=False)],
    model_hint: Annotated[Optional[str], typer.Option(
        help="controlvector.model_hint. [default: the model type]", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a llama.cpp control vector file (direction.N = output of block N; block 0 is skipped)."""
    vec = _read_vector(vector)
    prepare_out(out, overwrite)
    path = vec.to_gguf(out, model_hint=model_hint)
    typer.echo(f"wrote {path}")


@vector_app.command("import-gguf")
def import_gguf(
    gguf: Annotated[Path, typer.Argument(help="A llama.cpp / repeng control vector.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the vector into.", show_default=False)],
    overwrite: OverwriteOpt = False,
) -> None:
    """Read a llama.cpp control vector into an interplab vector folder."""
    from interplab.steering.gguf_io import import_gguf as read_gguf

    vec = read_gguf(gguf)
    prepare_out(out, overwrite)
    vec.save(out)
    typer.echo(f"saved {vec!r} to {out}")


@vector_app.command("info")
def info(vector: Annotated[Path, typer.Argument(help="A vector folder or .gguf file.", show_default=False)]) -> None:
    """Layers, norms and metadata of a saved vector."""
    vec = _read_vector(vector)
    typer.echo(repr(vec))
    typer.echo(f"fingerprint {vec.dataset_fingerprint or '-'}; settings {vec.settings}")


# --- parsing and helpers ----------------------------------------------------------------------

def _check_finite(value: float, option: str) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise UserInputError(f"{option} must be a finite number, got {value}")


def _dataset(pairs, caa, positive, negative, n_items, skip_invalid, split: str = "generate"):
    from interplab.steering.datasets import actadd_pair, caa_path, read_pairs

    given = [x is not None for x in (pairs, caa, positive or negative)]
    if sum(given) != 1:
        raise UserInputError("give exactly one source: --pairs FILE, --caa BEHAVIOUR, or --positive/--negative "
                             "(for eval: --test FILE or --caa BEHAVIOUR)")
    if positive is not None or negative is not None:
        if positive is None or negative is None:
            raise UserInputError("an ActAdd pair needs both --positive and --negative")
        return actadd_pair(positive, negative)
    check_positive(n_items, "--n-pairs" if split == "generate" else "--n-items")
    dataset = read_pairs(caa_path(caa, split) if caa else pairs, skip_invalid=skip_invalid)
    return dataset if n_items is None else dataset[:n_items]


def _read_vector(path: Path):
    from interplab.steering.gguf_io import import_gguf as read_gguf
    from interplab.steering.vector import load_vector

    return read_gguf(path) if str(path).endswith(".gguf") else load_vector(path)


def _print_report(result) -> None:
    best = result.best_layer()
    typer.echo("layer  held-out acc  pair acc  norm")
    for s in result.report:
        mark = "  <- best" if s.layer == best else ""
        typer.echo(f"{s.layer:>5}  {s.accuracy:>12.2f}  {s.pair_accuracy:>8.2f}  {s.norm:6.2f}{mark}")


def _print_sweep(rows) -> None:
    mults = sorted({r.scale for r in rows})
    typer.echo("A/B p(match) by layer (rows) and scale (columns)")
    typer.echo("layer " + " ".join(f"{m:>7g}" for m in mults))
    for layer in sorted({r.layer for r in rows}):
        cells = {r.scale: r.p_match for r in rows if r.layer == layer}
        typer.echo(f"{layer:>5} " + " ".join(f"{cells[m]:>7.3f}" for m in mults))


def _plot_report(report, path: Path) -> None:
    from interplab.figures import subplots
    from interplab.steering.evaluate import _save

    fig, ax = subplots(figsize=(6, 3.4))
    ax.plot([s.layer for s in report], [s.accuracy for s in report], marker="o", label="held-out accuracy")
    ax.plot([s.layer for s in report], [s.pair_accuracy for s in report], marker=".", label="pair accuracy")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="layer", ylabel="accuracy", ylim=(0, 1.02), title="separation of held-out pairs")
    ax.legend(fontsize=8)
    _save(fig, path)
