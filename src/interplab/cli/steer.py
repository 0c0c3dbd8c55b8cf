"""`interplab demo`, `interplab steer` and the `interplab vector ...` group.

Heavy modules (torch, transformers, interplab.steering) are imported inside the commands.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

vector_app = typer.Typer(no_args_is_help=True, help="Build, evaluate and convert steering vectors.")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="An alias, a local HF folder or a Hub id.")]
LayersOpt = Annotated[Optional[str], typer.Option(
    "--layers", "-l", help="Block indices: '6,10,14', a range '4-12', or 'all' (default: all).")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("demo")(demo)
    app.command("steer")(steer)
    app.add_typer(vector_app, name="vector")


# --- demo / steer -----------------------------------------------------------------------------

def demo(
    model: ModelOpt = "smollm2-135m-instruct",
    layer: Annotated[int, typer.Option(help="Block whose output is steered.")] = 7,
    scales: Annotated[str, typer.Option(help="Comma-separated scales, e.g. '2,3,4,-3'.")] = "2,3,4,-3",
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="New tokens per continuation.")] = 20,
) -> None:
    """The seed demo: "The weather in California is" ... then steered towards cold."""
    with _user_errors():
        from interplab.steering.demo import run_demo

        scale_values = parse_numbers(scales, "scale")
        handle = _load(model)
        _check_layer(handle, layer)
        run_demo(handle, layer=layer, scales=scale_values, max_new_tokens=tokens, out=typer.echo)


def steer(
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    vector: Annotated[Path, typer.Option("--vector", "-v", help="A vector folder (or a .gguf control vector).")],
    scale: Annotated[str, typer.Option("--scale", "-s", help="Multiplier of the vector.")] = "4",
    layers: LayersOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Default: the model the vector was made on.")] = None,
    positions: Annotated[str, typer.Option(help="all, caa (from the end of the instruction on) or actadd.")] = "all",
    norm_preserving: Annotated[bool, typer.Option(help="Keep each steered residual's norm.")] = False,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Apply the chat template (default: when the model has one).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 40,
    compare: Annotated[bool, typer.Option(help="Also print the unsteered continuation (same seed).")] = False,
    seed: int = 0,
) -> None:
    """Continue a prompt with a steering vector added."""
    with _user_errors():
        from interplab.generation import generate

        scale_value = parse_numbers(scale, "scale")[0]
        vec = _read_vector(vector)
        handle = _load(model or vec.model_id or "smollm2-135m-instruct")
        chosen = parse_layers(layers, handle.n_layers) if layers else None
        kwargs = dict(max_new_tokens=max_new_tokens, chat=chat, seed=seed)
        if compare:
            typer.echo(f"[baseline] {generate(handle, prompt, **kwargs)[0]}")
        with vec.apply(handle, layers=chosen, scale=scale_value, positions=positions,
                       norm_preserving=norm_preserving):
            typer.echo(f"[steered x{scale_value:g}] {generate(handle, prompt, **kwargs)[0]}")


# --- vector group -----------------------------------------------------------------------------

@vector_app.command("extract")
def extract(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the vector into.")],
    pairs: Annotated[Optional[Path], typer.Option(help="Contrast pairs: CAA A/B .json or .jsonl.")] = None,
    caa: Annotated[Optional[str], typer.Option(help="A CAA behaviour from the shared data, e.g. 'refusal' (generate split).")] = None,
    positive: Annotated[Optional[str], typer.Option(help="ActAdd: the positive prompt, e.g. 'Love'.")] = None,
    negative: Annotated[Optional[str], typer.Option(help="ActAdd: the negative prompt, e.g. 'Hate'.")] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    layers: LayersOpt = None,
    method: Annotated[str, typer.Option(help="mean_diff, pca_diff, pca_center or logistic.")] = "mean_diff",
    read: Annotated[str, typer.Option(help="auto, answer (A/B letter), last or mean (over the completion).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    holdout: Annotated[float, typer.Option(help="Share of pairs held out for the per-layer report.")] = 0.2,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N pairs.")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Drop A/B items whose answers are not (A)/(B).")] = False,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat")] = None,
    seed: int = 0,
) -> None:
    """Build a steering vector from contrast pairs (or an ActAdd prompt pair) and save it."""
    with _user_errors():
        from interplab.steering.evaluate import write_rows
        from interplab.steering.extract import extract_vector

        dataset = _dataset(pairs, caa, positive, negative, limit, skip_invalid)
        handle = _load(model)
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
    vector: Annotated[Path, typer.Argument(help="A vector folder.")],
    test: Annotated[Optional[Path], typer.Option(help="Held-out A/B items (CAA JSON).")] = None,
    caa: Annotated[Optional[str], typer.Option(help="Use the CAA test split of this behaviour, e.g. 'refusal'.")] = None,
    multipliers: Annotated[str, typer.Option(help="Comma-separated, e.g. '-2,-1,0,1,2'.")] = "-2,-1,0,1,2",
    layers: LayersOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Default: the model the vector was made on.")] = None,
    positions: Annotated[str, typer.Option(help="Where to add it for the A/B score: caa or all.")] = "caa",
    damage_check: Annotated[bool, typer.Option("--damage/--no-damage", help="Measure the cost on neutral text.")] = True,
    prompt: Annotated[Optional[list[str]], typer.Option(help="Open-ended prompt(s) for side-by-side generations.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 30,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N test items.")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Drop A/B items whose answers are not (A)/(B).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results folder (default: VECTOR/eval).")] = None,
) -> None:
    """A/B score sweep (layer x multiplier), damage on neutral text, open-ended samples."""
    with _user_errors():
        from interplab.steering import evaluate as ev

        mults = parse_numbers(multipliers, "multiplier")
        vec = _read_vector(vector)
        handle = _load(model or vec.model_id or "smollm2-135m-instruct")
        chosen = parse_layers(layers, handle.n_layers) if layers else None
        out = out or vector / "eval"
        if test is not None or caa is not None:
            dataset = _dataset(test, caa, None, None, limit, skip_invalid, split="test")
            rows = ev.ab_sweep(handle, vec, dataset, layers=chosen, multipliers=mults, positions=positions,
                               batch_size=batch_size, progress=True)
            ev.write_rows(rows, out, "ab_sweep")
            ev.plot_sweep(rows, out / "ab_sweep.png", title=f"A/B score ({Path(dataset.source).parent.name or 'test'})")
            ev.plot_heatmap(rows, out / "ab_heatmap.png")
            _print_sweep(rows)
        if damage_check:
            rows = ev.damage(handle, vec, layers=chosen, multipliers=mults, progress=True)
            ev.write_rows(rows, out, "damage")
            ev.plot_damage(rows, out / "damage.png")
            for r in rows:
                typer.echo(f"damage  layer {r.layer:>2}  x{r.multiplier:+g}: ΔCE {r.delta_ce:+.3f} nats, KL {r.kl:.3f}")
        if prompt:
            layer = (chosen or vec.layers)[0]
            gens = ev.side_by_side(handle, vec, prompt, layer=layer, scales=[m for m in mults if m != 0],
                                   max_new_tokens=max_new_tokens)
            ev.write_json(out / "generations.json", gens)
            for g in gens:
                typer.echo(f"[layer {g['layer']} x{g['scale']:+g}] {g['prompt']!r} -> {g['text']!r}")
        typer.echo(f"results in {out}")


@vector_app.command("export-gguf")
def export_gguf(
    vector: Annotated[Path, typer.Argument(help="A vector folder.")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    model_hint: Annotated[Optional[str], typer.Option(help="controlvector.model_hint (default: the model type).")] = None,
) -> None:
    """Write a llama.cpp control vector (direction.N = output of block N; block 0 is skipped)."""
    with _user_errors():
        vec = _read_vector(vector)
        path = vec.to_gguf(out, model_hint=model_hint)
        typer.echo(f"wrote {path}")


@vector_app.command("import-gguf")
def import_gguf(
    gguf: Annotated[Path, typer.Argument(help="A llama.cpp / repeng control vector.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the vector into.")],
) -> None:
    """Read a llama.cpp control vector into an interplab vector folder."""
    with _user_errors():
        from interplab.steering.gguf_io import import_gguf as read_gguf

        vec = read_gguf(gguf)
        vec.save(out)
        typer.echo(f"saved {vec!r} to {out}")


@vector_app.command("info")
def info(vector: Annotated[Path, typer.Argument(help="A vector folder or .gguf file.")]) -> None:
    """Layers, norms and metadata of a saved vector."""
    with _user_errors():
        vec = _read_vector(vector)
        typer.echo(repr(vec))
        typer.echo(f"fingerprint {vec.dataset_fingerprint or '-'}; settings {vec.settings}")


# --- parsing and helpers ----------------------------------------------------------------------

def parse_numbers(text: str, what: str = "number") -> list[float]:
    """'-2,-1,0,1,2' -> floats, or a ValueError naming the bad entry."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{what} {part!r} is not a number (give comma-separated numbers, e.g. -2,0,2)") from None
        if values[-1] != values[-1] or values[-1] in (float("inf"), float("-inf")):
            raise ValueError(f"{what} {part!r} is not a finite number")
    return values


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'6,10', '4-12' or 'all' -> block indices, checked against the model."""
    text = text.strip()
    if text == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"layer {part.strip()!r} is not an integer or a range like 4-12")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        for layer in range(first, last + 1):
            if not -n_layers <= layer < n_layers:
                raise ValueError(f"layer {layer} is out of range: the model has {n_layers} blocks "
                                 f"(valid 0..{n_layers - 1} or -{n_layers}..-1)")
            layers.append(layer % n_layers)
    if not layers:
        raise ValueError("no layers given")
    return list(dict.fromkeys(layers))


def _dataset(pairs, caa, positive, negative, limit, skip_invalid, split: str = "generate"):
    from interplab.steering.datasets import actadd_pair, caa_path, read_pairs

    given = [x is not None for x in (pairs, caa, positive or negative)]
    if sum(given) != 1:
        raise ValueError("give exactly one source: --pairs FILE, --caa BEHAVIOUR, or --positive/--negative "
                         "(for eval: --test FILE or --caa BEHAVIOUR)")
    if positive is not None or negative is not None:
        if positive is None or negative is None:
            raise ValueError("an ActAdd pair needs both --positive and --negative")
        return actadd_pair(positive, negative)
    dataset = read_pairs(caa_path(caa, split) if caa else pairs, skip_invalid=skip_invalid)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        dataset = dataset[:limit]
    return dataset


def _read_vector(path: Path):
    from interplab.steering.gguf_io import import_gguf as read_gguf
    from interplab.steering.vector import load_vector

    return read_gguf(path) if str(path).endswith(".gguf") else load_vector(path)


def _load(name: str):
    from interplab.cli.core import _load as load_model

    return load_model(name)


def _check_layer(handle, layer: int) -> None:
    parse_layers(str(layer), handle.n_layers)


class _user_errors:
    """Turn ValueError/TypeError from the library into 'error: ...' and exit code 2."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, (ValueError, TypeError, KeyError)):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        return False


def _print_report(result) -> None:
    best = result.best_layer()
    typer.echo("layer  held-out acc  pair acc  norm")
    for s in result.report:
        mark = "  <- best" if s.layer == best else ""
        typer.echo(f"{s.layer:>5}  {s.accuracy:>12.2f}  {s.pair_accuracy:>8.2f}  {s.norm:6.2f}{mark}")


def _print_sweep(rows) -> None:
    mults = sorted({r.multiplier for r in rows})
    typer.echo("A/B p(match) by layer (rows) and multiplier (columns)")
    typer.echo("layer " + " ".join(f"{m:>7g}" for m in mults))
    for layer in sorted({r.layer for r in rows}):
        cells = {r.multiplier: r.p_match for r in rows if r.layer == layer}
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
