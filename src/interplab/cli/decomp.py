"""`interplab sae bench | transcoders | graph`: decomposition evaluations, transcoders and
attribution graphs. The commands are registered on the `sae` Typer app (imported at the end of
`interplab.cli.sae`); heavy imports stay inside the command bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from interplab.cli.sae import ModelOpt, SiteOpt, _console, _load_model, _load_sae, _user_errors, app


@app.command("bench")
def bench(
    sae_paths: Annotated[list[Path], typer.Argument(help="One or more SAE folders (same model).")],
    out: Annotated[Path, typer.Option(help="Folder for one results JSON per SAE and comparison.png.")],
    model: ModelOpt = None,
    site: SiteOpt = None,
    ks: Annotated[str, typer.Option(help="Comma-separated numbers of latents for k-sparse probing.")] = "1,2,5,10,20",
    max_tokens: Annotated[int, typer.Option(help="Word tokens from the tokenizer to build the tasks from.")] = 4000,
    seed: int = 0,
) -> None:
    """Feature absorption (first letter) and k-sparse probing per SAE: a results table each and a
    comparison plot across them."""
    from interplab.sae.evals.table import bench_sae, plot_comparison, write_results

    with _user_errors():
        k_values = _ints(ks, "--ks")
        saes = [_load_sae(path, site) for path in sae_paths]
    handle = _load_model(model, saes[0])
    tables = []
    with _user_errors():
        out.mkdir(parents=True, exist_ok=True)
        for path, sae in zip(sae_paths, saes):
            table = bench_sae(handle, sae, site=site, ks=k_values, max_tokens=max_tokens, seed=seed, name=path.name)
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


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers such as 1,2,5; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes positive integers such as 1,2,5; got {text!r}")
    return values


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2))


__all__ = ["bench"]
_ = (Optional,)
