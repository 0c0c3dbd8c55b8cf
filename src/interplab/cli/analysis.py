"""`interplab ablate`, `patch`, `attribute`, `lens`, `embed-math`: which parts of a model do the work.

Each command writes tables (CSV, JSON) and PNG heatmaps into `--out` and prints a summary.
Torch and the analysis modules are imported inside the command bodies, so `interplab --help`
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from interplab.cli.core import load_model as _load
from interplab.cli.options import (
    DEFAULT_MODEL, N_PROMPTS, ModelOpt, OverwriteOpt, check_choice, check_layers_early, check_positive, prepare_out,
)
from interplab.errors import UserInputError

TaskOpt = Annotated[str, typer.Option("--task", "-t", help="'ioi' (generated indirect-object prompts) or a JSONL facts file "
                                      "(lines: {\"prompt\", \"answer\", optional \"incorrect\", \"corrupted\"}).")]
NOpt = Annotated[int, typer.Option("--n-prompts", help="Number of IOI prompts (ignored for a facts file).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the IOI prompts and resampling.")]
TemplateOpt = Annotated[Optional[int], typer.Option(help="Use only this IOI template (0-7), so that absolute "
                                                         "positions line up across prompts.")]
LayersOpt = Annotated[str, typer.Option("--layers", "-l", help="Layers: 'all', or e.g. '0-5,9' (negative: from the end).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the CSV, JSON and PNG files (refused if it "
                                                          "exists, unless --overwrite).")]
PositionsOpt = Annotated[str, typer.Option(
    help="Grid columns: 'marks' (named positions such as IO, S1, S2, end), 'each' (every position), 'all' "
         "(every position at once), or a comma list of positions and mark names. For --grid heads/layers: one "
         "position or mark, else every position at once.")]
GridOpt = Annotated[str, typer.Option(help="'resid' (layer x position), 'heads' (layer x head) or 'layers' "
                                           "(attention and MLP output x layer).")]
CellsOpt = Annotated[int, typer.Option(help="Patching cells computed together in one forward pass.")]

GRIDS = ("resid", "heads", "layers")
KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
DIRECTIONS = ("denoise", "noise")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("ablate")(ablate)
    app.command("patch")(patch)
    app.command("attribute")(attribute)
    app.command("lens")(lens)
    app.command("embed-math")(embed_math)


# --- commands ---------------------------------------------------------------------------------

def ablate(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "ioi",
    n_prompts: NOpt = N_PROMPTS,
    seed: SeedOpt = 0,
    template: TemplateOpt = None,
    method: Annotated[str, typer.Option(help="'zero', 'mean' or 'resample'.")] = "mean",
    per_position: Annotated[bool, typer.Option(help="Mean over the reference at each position instead of over all positions.")] = False,
    layers: LayersOpt = "all",
    mlps: Annotated[bool, typer.Option(help="Also ablate each layer's MLP output.")] = True,
    components: Annotated[Optional[str], typer.Option(help="Instead of a sweep, ablate these together, e.g. 'L9H6,L10H0,L3.mlp'.")] = None,
    cells_per_forward: CellsOpt = 16,
    top: Annotated[int, typer.Option(help="How many parts to name in the summary.")] = 10,
    out: OutOpt = Path("runs/ablate"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Ablate every head (and MLP) one at a time and report the metric's change (table + heatmap)."""
    from interplab.analysis.ablation import ablated_metric, ablation_sweep, sweep_summary
    from interplab.analysis.report import write_json

    check_choice(method, "--method", ("zero", "mean", "resample"))
    check_positive(cells_per_forward, "--cells-per-forward")
    _check_task_options(model, task, n_prompts, template, layers, out, overwrite)
    handle = _load(model)
    the_task = _task(handle, task, n_prompts, seed, template)
    if components:
        names = [c.strip() for c in components.split(",") if c.strip()]
        before = _clean_metric(handle, the_task)
        after = ablated_metric(handle, the_task, names, method=method, per_position=per_position, seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "ablate.json", {"components": names, "method": method, "metric": the_task.metric,
                                         "before": before, "after": after})
        typer.echo(f"{the_task.metric}: {before:.4f} -> {after:.4f} with {', '.join(names)} {method}-ablated")
        return
    grid = ablation_sweep(handle, the_task, method=method, layers=layers, mlps=mlps, per_position=per_position,
                          seed=seed, cells_per_forward=cells_per_forward, progress=True)
    paths = grid.save(out, f"ablate_{method}")
    typer.echo(f"baseline {the_task.metric}: {grid.meta['baseline_metric']:.4f} on {len(the_task)} prompts")
    typer.echo(f"parts whose {method} ablation lowers {the_task.metric} most:")
    for line in sweep_summary(grid, top):
        typer.echo(f"  {line}")
    _said(paths)


def patch(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "ioi",
    n_prompts: NOpt = N_PROMPTS,
    seed: SeedOpt = 0,
    template: TemplateOpt = None,
    grid: GridOpt = "resid",
    positions: PositionsOpt = "marks",
    kind: Annotated[str, typer.Option(help="Residual site for --grid resid: hook_resid_pre, _mid or _post.")] = "hook_resid_pre",
    direction: Annotated[str, typer.Option(help="'denoise' (clean into corrupted) or 'noise' (corrupted into clean).")] = "denoise",
    layers: LayersOpt = "all",
    cells_per_forward: CellsOpt = 16,
    out: OutOpt = Path("runs/patch"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Activation patching: normalised metric recovery per layer x position, head or layer output.

    8 IOI prompts at every layer of the default model: about a minute of CPU time."""
    _check_grid_options(grid, positions, kind, direction, cells_per_forward)
    _check_task_options(model, task, n_prompts, template, layers, out, overwrite)
    handle = _load(model)
    the_task = _task(handle, task, n_prompts, seed, template)
    result = _patch_grid(handle, the_task, grid, positions, kind, direction, layers, "patch", cells_per_forward)
    paths = result.save(out, f"patch_{grid}")
    _print_grid_summary(result)
    _said(paths)


def attribute(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "ioi",
    n_prompts: NOpt = N_PROMPTS,
    seed: SeedOpt = 0,
    template: TemplateOpt = None,
    grid: GridOpt = "resid",
    positions: PositionsOpt = "marks",
    kind: Annotated[str, typer.Option(help="Residual site for --grid resid.")] = "hook_resid_pre",
    direction: Annotated[str, typer.Option(help="'denoise' or 'noise'.")] = "denoise",
    layers: LayersOpt = "all",
    compare: Annotated[bool, typer.Option(help="Also run true patching (much slower) and report how well attribution "
                                               "tracks it.")] = False,
    cells_per_forward: CellsOpt = 16,
    out: OutOpt = Path("runs/attribute"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Attribution patching (gradient estimate of a patching grid); --compare checks it against true patching."""
    import time

    from interplab.analysis.attribution import compare_grids
    from interplab.analysis.report import scatter, write_json

    _check_grid_options(grid, positions, kind, direction, cells_per_forward)
    _check_task_options(model, task, n_prompts, template, layers, out, overwrite)
    handle = _load(model)
    the_task = _task(handle, task, n_prompts, seed, template)
    start = time.perf_counter()
    approx = _patch_grid(handle, the_task, grid, positions, kind, direction, layers, "attribution", cells_per_forward)
    approx_s = time.perf_counter() - start
    paths = approx.save(out, f"attribution_{grid}")
    _print_grid_summary(approx)
    if compare:
        start = time.perf_counter()
        exact = _patch_grid(handle, the_task, grid, positions, kind, direction, layers, "patch", cells_per_forward)
        exact_s = time.perf_counter() - start
        paths.update({f"exact_{k}": v for k, v in exact.save(out, f"patch_{grid}").items()})
        stats = {**compare_grids(exact, approx), "attribution_seconds": approx_s, "patching_seconds": exact_s}
        write_json(out / f"compare_{grid}.json", stats)
        paths["scatter"] = scatter(exact.values, approx.values, out / f"compare_{grid}.png",
                                   xlabel="true patching recovery", ylabel="attribution estimate",
                                   title=f"attribution vs patching: r = {stats['pearson']:.3f}")
        typer.echo(f"attribution vs true patching: pearson r = {stats['pearson']:.3f}, mean |error| = "
                   f"{stats['mean_abs_error']:.3f}, max |error| = {stats['max_abs_error']:.3f}, sign agreement "
                   f"{stats['sign_agreement']:.0%}; time {approx_s:.1f}s vs {exact_s:.1f}s")
    _said(paths)


def lens(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeat for several).")] = None,
    answer: Annotated[Optional[str], typer.Option(help="Track this answer word (one token, e.g. ' Mary').")] = None,
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="'ioi' or a facts file: lens its prompts and "
                                                "run direct logit attribution.")] = None,
    n_prompts: NOpt = N_PROMPTS,
    seed: SeedOpt = 0,
    top_k: Annotated[int, typer.Option(help="Top tokens kept per layer and position.")] = 5,
    out: OutOpt = Path("runs/lens"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Logit lens (top tokens, answer rank and probability per layer and position) and direct logit attribution."""
    from interplab.analysis.lens import direct_logit_attribution, logit_lens
    from interplab.analysis.report import heatmap, write_json

    if prompt and task:
        raise UserInputError("give either --prompt (with --answer) or --task, not both")
    if answer is not None and task:
        raise UserInputError("--answer goes with --prompt; a --task brings its own answers")
    if not prompt and not task:
        raise UserInputError("give --prompt TEXT (and --answer WORD) or --task ioi")
    check_positive(top_k, "--top-k")
    _check_task_options(model, task, n_prompts, None, None, out, overwrite)
    handle = _load(model)
    the_task = _task(handle, task, n_prompts, seed, None) if task else None
    prompts = list(prompt) if prompt else list(the_task.clean)
    answers = answer if prompt else list(the_task.correct)
    result = logit_lens(handle, prompts, answer=answers, top_k=top_k)
    value = "answer_log_prob" if answers is not None else "top_log_prob"
    grid = result.grid(0, value)
    paths = grid.save(out, "lens", plot=False)
    paths["png"] = heatmap(grid, out / "lens.png", annotate=result.top_token_table(0))
    write_json(out / "lens_top_tokens.json", {"rows": result.rows, "tokens": result.tokens,
                                               "top_tokens": result.top_tokens,
                                               "top_log_probs": result.top_log_probs.tolist()})
    _print_lens(result)
    if the_task is not None:
        dla = direct_logit_attribution(handle, the_task)
        paths.update({f"dla_{k}": v for k, v in dla.grid().save(out, "dla").items()})
        typer.echo(f"direct logit attribution of the {dla.meta['what']} ({dla.readout:.3f}; parts sum to "
                   f"{dla.total:.3f}; final norm scale frozen from the clean run):")
        for name, value in dla.top(10):
            typer.echo(f"  {name:10s} {value:+.4f}")
    _said(paths)


def embed_math(
    expression: Annotated[str, typer.Argument(help="e.g. \"king - man + woman\" (quote words with spaces).")],
    model: ModelOpt = DEFAULT_MODEL,
    space: Annotated[str, typer.Option(help="'embed' (input embeddings) or 'unembed' (output matrix).")] = "embed",
    top_k: Annotated[int, typer.Option(help="How many nearest tokens to show.")] = 10,
    leading_space: Annotated[bool, typer.Option(help="Prefix each word with a space (' king').")] = True,
    multi_token: Annotated[str, typer.Option(help="A word of several tokens: 'error' or 'mean' (of its tokens).")] = "error",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write embed_math.json into this folder.",
                                                show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Embedding arithmetic: the nearest tokens (by cosine) to e.g. king - man + woman, excluding the inputs."""
    from interplab.analysis.embedding import embedding_arithmetic
    from interplab.analysis.report import write_json

    check_choice(space, "--space", ("embed", "unembed"))
    check_choice(multi_token, "--multi-token", ("error", "mean"))
    check_positive(top_k, "--top-k")
    if out is not None:
        prepare_out(out / "embed_math.json", overwrite)
    handle = _load(model)
    nearest = embedding_arithmetic(handle, expression, space=space, top_k=top_k, leading_space=leading_space,
                                   multi_token=multi_token)
    typer.echo(f"{expression}  ({space} space, cosine):")
    for token, cosine in nearest:
        typer.echo(f"  {token!r:20s} {cosine:.4f}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "embed_math.json", {"expression": expression, "space": space,
                                             "nearest": [[t, c] for t, c in nearest]})
        _said({"json": out / "embed_math.json"})


# --- helpers ----------------------------------------------------------------------------------

def _check_task_options(model: str, task: str | None, n_prompts: int, template: int | None, layers: str | None,
                        out: Path, overwrite: bool) -> None:
    """Everything about the task and the output that can be checked before the model loads."""
    from interplab.analysis.tasks import IOI_TEMPLATES

    check_positive(n_prompts, "--n-prompts")
    if task is not None and task != "ioi" and not Path(task).is_file():
        raise UserInputError(f"--task must be 'ioi' or a JSONL facts file; {task!r} is neither")
    if template is not None and not 0 <= template < len(IOI_TEMPLATES):
        raise UserInputError(f"--template must be in 0..{len(IOI_TEMPLATES) - 1}, got {template}")
    check_layers_early(layers, model)
    prepare_out(out, overwrite)


def _check_grid_options(grid: str, positions: str, kind: str, direction: str, cells_per_forward: int) -> None:
    check_choice(grid, "--grid", GRIDS)
    check_choice(kind, "--kind", KINDS)
    check_choice(direction, "--direction", DIRECTIONS)
    check_positive(cells_per_forward, "--cells-per-forward")
    if grid != "resid":
        single = _positions(positions)
        if single not in ("all", "marks", None) and len(single) != 1:
            raise UserInputError(f"--grid {grid} patches every position at once or one position; got {positions!r}")


def _task(handle, task: str, n: int, seed: int, template: int | None):
    from interplab.analysis.tasks import IOI_TEMPLATES, ioi_task, load_facts

    if task == "ioi":
        templates = None
        if template is not None:
            if not 0 <= template < len(IOI_TEMPLATES):
                raise ValueError(f"--template must be in 0..{len(IOI_TEMPLATES) - 1}, got {template}")
            templates = [IOI_TEMPLATES[template]]
        return ioi_task(n, seed=seed, templates=templates, tokenizer=handle.require_tokenizer())
    return load_facts(task)


def _clean_metric(handle, task) -> float:
    from interplab.analysis.cells import final_logits

    enc = task.encode(handle)
    return float(enc.score(final_logits(handle, enc.clean_ids, enc.clean_mask, enc.last("clean"))).mean())


def _positions(text: str):
    if text == "each":
        return None
    if text in ("marks", "all"):
        return text
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [int(item) if item.lstrip("-").isdigit() else item for item in items]


def _patch_grid(handle, task, grid: str, positions: str, kind: str, direction: str, layers: str, method: str,
                cells_per_forward: int):
    from interplab.analysis.patching import patch_heads, patch_layers, patch_residual

    common = dict(layers=layers, direction=direction, method=method, cells_per_forward=cells_per_forward,
                  progress=True)
    if grid == "resid":
        return patch_residual(handle, task, kind=kind, columns=_positions(positions), **common)
    single = _positions(positions)
    if single in ("all", "marks", None):
        position = None  # heads and layer outputs: patched at every position at once
    elif len(single) == 1:
        position = single[0]
    else:
        raise ValueError(f"--grid {grid} patches every position at once or one position; got {positions!r}")
    if grid == "heads":
        return patch_heads(handle, task, position=position, **common)
    if grid == "layers":
        return patch_layers(handle, task, position=position, **common)
    raise ValueError(f"--grid must be 'resid', 'heads' or 'layers', got {grid!r}")


def _print_grid_summary(grid) -> None:
    meta = grid.meta
    typer.echo(f"{meta.get('metric')}: clean {meta['clean_metric']:.4f}, corrupted {meta['corrupted_metric']:.4f} "
               f"({meta.get('n_prompts')} prompts, {meta.get('direction')})")
    typer.echo("cells with the highest recovery:")
    for row, col, value in grid.top(8):
        typer.echo(f"  {row:14s} {col:14s} {value:+.3f}")


def _print_lens(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"logit lens, prompt 0, last position (answer {result.answers[0]!r})" if result.answers
                  else "logit lens, prompt 0, last position")
    for column in ("layer", "top tokens (log p)", "answer log p", "answer rank"):
        table.add_column(column)
    last = len(result.tokens[0]) - 1
    for r, row in enumerate(result.rows):
        tops = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(result.top_tokens[0][r][last][:3],
                                                             result.top_log_probs[0, r, last, :3].tolist()))
        p = "" if result.answer_log_prob is None else f"{float(result.answer_log_prob[0, r, last]):.3f}"
        rank = "" if result.answer_rank is None else str(int(result.answer_rank[0, r, last]))
        table.add_row(row, tops, p, rank)
    Console().print(table)


def _said(paths: dict) -> None:
    for path in paths.values():
        typer.echo(f"wrote {path}")
