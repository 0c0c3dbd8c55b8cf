"""`interplab sae bench | transcoders | graph`: decomposition evaluations, transcoders and
attribution graphs. The commands are registered on the `sae` Typer app (imported at the end of
`interplab.cli.sae`); heavy imports stay inside the command bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from interplab.cli.options import OverwriteOpt, prepare_out
from interplab.cli.sae import ModelOpt, SiteOpt, _console, _load_model, _load_sae, _user_errors, app


@app.command("bench")
def bench(
    sae_paths: Annotated[list[Path], typer.Argument(help="One or more SAE folders (same model).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for one results JSON per SAE and comparison.png.")],
    model: ModelOpt = None,
    site: SiteOpt = None,
    ks: Annotated[str, typer.Option(help="Comma-separated numbers of latents for k-sparse probing.")] = "1,2,5,10,20",
    max_tokens: Annotated[int, typer.Option(help="Word tokens from the tokenizer to build the tasks from.")] = 4000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    caa: Annotated[str, typer.Option(help="Comma-separated CAA behaviours (e.g. sycophancy,refusal) or A/B JSON "
                                          "files: one more probing task each ('' for none).")] = "",
    n_pairs: Annotated[int, typer.Option(help="A/B questions read per CAA behaviour.")] = 100,
    overwrite: OverwriteOpt = False,
) -> None:
    """Feature absorption (first letter) and k-sparse probing per SAE: a results table each and a
    comparison plot across them."""
    from interplab.sae.evals.table import bench_sae, plot_comparison, write_results

    with _user_errors():
        k_values = _ints(ks, "--ks")
        behaviors = _caa_behaviors(caa, n_pairs)
        saes = [_load_sae(path, site) for path in sae_paths]
        prepare_out(out, overwrite)
    handle = _load_model(model, saes[0])
    tables = []
    with _user_errors():
        out.mkdir(parents=True, exist_ok=True)
        for path, sae in zip(sae_paths, saes):
            table = bench_sae(handle, sae, site=site, ks=k_values, max_tokens=max_tokens, seed=seed, name=path.name,
                              caa=behaviors, n_pairs=n_pairs)
            write_results(out / f"{path.name}.json", table)
            tables.append(table)
        plot_comparison(tables, out / "comparison.png")
    for table in tables:
        probing = table["sparse_probing"]
        _console().print(
            f"{table['name']}: absorption {_rate(table['absorption']['mean_absorption_rate'])}, "
            f"probing k=1 {probing['mean_sae_accuracy'][str(k_values[0])]:.3f} "
            f"(raw {probing['mean_raw_accuracy']:.3f})")
    _console().print(f"results in {out} (one JSON per SAE, comparison.png)")


@app.command("transcoders")
def transcoders(
    corpus: Annotated[str, typer.Option(help="Text/JSONL file or folder to harvest from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the transcoders (one layer_<L> folder each).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model alias, folder or Hub id.")] = "smollm2-135m-instruct",
    layers: Annotated[str, typer.Option(help="Comma-separated layers, or 'all'.")] = "all",
    family: Annotated[str, typer.Option(help="topk, relu or jumprelu.")] = "topk",
    d_sae: Annotated[Optional[int], typer.Option(help="Latents (default: 8 x d_model).")] = None,
    k: Annotated[int, typer.Option(help="Active latents per token (topk).")] = 32,
    skip: Annotated[bool, typer.Option(help="Train skip transcoders (a linear skip term).")] = True,
    steps: Annotated[int, typer.Option(help="Optimiser steps per transcoder.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Tokens per batch.")] = 1024,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-3,
    n_tokens: Annotated[Optional[int], typer.Option(help="Tokens read per pass (default: all).")] = None,
    eval_contexts: Annotated[int, typer.Option(help="Windows after the training ones to measure CE recovered on (0: skip).")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a transcoder per layer from one harvest pass, save them, and splice them in for the MLPs."""
    from interplab.sae.store import corpus_windows
    from interplab.sae.train import TrainConfig
    from interplab.sae.transcoder import save_transcoders
    from interplab.sae.transcoder_train import evaluate_transcoders, train_transcoders

    with _user_errors():
        prepare_out(out, overwrite)
    handle = _load_model(model)
    with _user_errors():
        chosen = list(range(handle.n_layers)) if layers == "all" else _ints(layers, "--layers", minimum=0)
        trained = train_transcoders(handle, corpus, chosen, TrainConfig(n_steps=steps, lr=lr, seed=seed, tensorboard=False),
                                    d_sae=d_sae or 8 * handle.d_model, family=family, k=k, skip=skip,
                                    max_tokens=n_tokens, batch_size=batch_size)
        save_transcoders(trained, out)
        _console().print(f"transcoders for layers {sorted(trained)} saved to {out}")
        if eval_contexts:
            skip_contexts = (n_tokens or 0) // 127 + 1
            windows = corpus_windows(handle, corpus, context_length=128, skip_contexts=skip_contexts, n_contexts=eval_contexts)
            _print_json(evaluate_transcoders(handle, trained, windows).to_dict())


@app.command("graph")
def graph(
    transcoders_path: Annotated[Path, typer.Argument(help="A folder written by `interplab sae transcoders`.")],
    prompt: Annotated[str, typer.Option(help="The prompt (its last position is attributed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for graph.json and graph.html.")],
    model: ModelOpt = None,
    target: Annotated[Optional[str], typer.Option(help="Target token (default: the top prediction).")] = None,
    node_threshold: Annotated[float, typer.Option(help="Fraction of feature influence to keep.")] = 0.8,
    edge_threshold: Annotated[float, typer.Option(help="Fraction of edge influence to keep.")] = 0.98,
    batch_size: Annotated[int, typer.Option(help="Targets per backward pass.")] = 64,
    check: Annotated[int, typer.Option(help="Ablate this many top features and compare with the graph (0: no check).")] = 3,
    overwrite: OverwriteOpt = False,
) -> None:
    """Attribution graph of one prompt: pruned JSON, a standalone HTML page, and an intervention check."""
    from interplab.files import write_json
    from interplab.graph.attribution import attribute
    from interplab.graph.check import check_interventions
    from interplab.graph.html import write_graph_html
    from interplab.graph.prune import prune
    from interplab.sae.transcoder import load_transcoders

    with _user_errors():
        loaded = load_transcoders(transcoders_path)
        if not loaded:
            raise ValueError(f"{transcoders_path} holds no transcoder")
        prepare_out(out, overwrite)
    handle = _load_model(model or next(iter(loaded.values())).cfg.model_id)
    with _user_errors():
        ids = handle.require_tokenizer()(prompt, return_tensors="pt")["input_ids"][0]
        full = attribute(handle, loaded, ids, target=target, batch_size=batch_size)
        pruned = prune(full, node_threshold=node_threshold, edge_threshold=edge_threshold)
        if check:
            checks = check_interventions(handle, loaded, full, ids, top=check)
            pruned.meta["interventions"] = [c.__dict__ for c in checks]
        out.mkdir(parents=True, exist_ok=True)
        data = pruned.to_dict()
        write_json(out / "graph.json", data)
        write_graph_html(data, out / "graph.html")
    meta = pruned.meta
    _console().print(f"target {full.target['token']!r}: {meta['features_kept']}/{meta['features_total']} features kept "
                     f"({meta['node_influence_kept']:.1%} of influence); {out / 'graph.html'}")
    for c in meta.get("interventions", []):
        _console().print(f"  ablate {c['nodes']}: predicted {c['predicted']:+.3f}, constrained {c['constrained']:+.3f} "
                         f"({c['crossings']} latents switched), free {c['measured']:+.3f}")


def _caa_behaviors(text: str, n_pairs: int) -> list[str]:
    """--caa names or files, each checked (a readable A/B file) before the model loads."""
    from interplab.sae.evals.tasks import caa_dataset

    behaviors = [part.strip() for part in text.split(",") if part.strip()]
    if behaviors and n_pairs < 4:
        raise ValueError(f"--n-pairs must be >= 4 (each class needs a few examples), got {n_pairs}")
    for behavior in behaviors:
        caa_dataset(behavior)
    return behaviors


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ints(text: str, option: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers such as 1,2,5; got {text!r}") from None
    if not values or min(values) < minimum:
        raise ValueError(f"{option} takes integers >= {minimum} such as 1,2,5; got {text!r}")
    return values


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2))


__all__ = ["bench", "graph", "transcoders"]

from interplab.cli import explain as _explain  # noqa: E402,F401  registers `sae explain` on the same app
