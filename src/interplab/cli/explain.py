"""`interplab sae explain`: label SAE features with a language model behind any OpenAI-compatible
endpoint and score the labels (detection, simulation). Registered on the `sae` Typer app (imported
at the end of `interplab.cli.decomp`); heavy imports stay inside the command body."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from interplab.cli.options import OverwriteOpt, SeedOpt, check_positive, prepare_out
from interplab.cli.sae import ModelOpt, SaePath, SiteOpt, _console, _load_model, _load_sae, app
from interplab.errors import UserInputError

RESULTS_FILE = "explanations.json"


@app.command("explain")
def explain(
    sae_path: SaePath,
    index: Annotated[Path, typer.Option(help="The SAE's feature index (SQLite file from `interplab sae features`).",
                                        show_default=False)],
    features: Annotated[str, typer.Option(help="Comma-separated latent ids, e.g. 0,5,9.", show_default=False)],
    base_url: Annotated[str, typer.Option(help="An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                               "(`interplab serve`).", show_default=False)],
    explainer: Annotated[str, typer.Option(help="Model name at the endpoint; it writes the labels and scores them.",
                                           show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help=f"Folder for {RESULTS_FILE} (labels, scores, settings).",
                                      show_default=False)],
    api_key_env: Annotated[Optional[str], typer.Option(
        help="Environment variable holding the endpoint's API key. [default: no key]", show_default=False)] = None,
    detection: Annotated[bool, typer.Option("--detection/--no-detection",
                                            help="Detection score (yes/no per text).")] = True,
    simulation: Annotated[bool, typer.Option("--simulation/--no-simulation",
                                             help="Simulation score (per-token activations, correlation).")] = True,
    n_shown: Annotated[int, typer.Option(help="Top contexts shown to the explainer.")] = 10,
    n_scored: Annotated[int, typer.Option(help="Held-out top contexts scored, and as many non-activating ones.")] = 5,
    model: ModelOpt = None,
    site: SiteOpt = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Explain features from their top contexts and score the labels. Everything is checked before
    the first request: the features, the index (built from this SAE), the endpoint."""
    from interplab.files import atomic_folder, write_json
    from interplab.sae.evals.autointerp import chat_client, check_endpoint
    from interplab.sae.evals.autointerp_run import check_features, explain_features
    from interplab.sae.features import FeatureIndex

    chosen = _feature_ids(features)
    check_positive(n_shown, "--n-shown")
    check_positive(n_scored, "--n-scored")
    api_key = _api_key(api_key_env)
    sae = _load_sae(sae_path, site)
    with FeatureIndex(index, sae=sae) as feature_index:
        check_features(feature_index, chosen)
        if not (overwrite and out.is_dir()):  # an old folder stays until the new one is swapped in whole
            prepare_out(out, overwrite)
        client = chat_client(base_url, api_key=api_key)
        check_endpoint(client)
        handle = _load_model(model or sae.cfg.model_id or feature_index.meta.get("model_id"))
        results = explain_features(client, explainer, handle, sae, feature_index, chosen, n_shown=n_shown,
                                   n_scored=n_scored, detection=detection, simulation=simulation, seed=seed,
                                   progress=True)
    results.update(sae=str(sae_path), base_url=base_url)
    with atomic_folder(out) as tmp:
        write_json(tmp / RESULTS_FILE, results)
    for row in results["features"]:
        _console().print(_summary(row), markup=False, highlight=False)
    _console().print(f"labels and scores in {out / RESULTS_FILE}")


def _feature_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"--features takes comma-separated latent ids such as 0,5,9; got {text!r}") from None
    if not ids:
        raise UserInputError("--features is empty; give latent ids such as 0,5,9")
    return list(dict.fromkeys(ids))


def _api_key(variable: str | None) -> str:
    if variable is None:
        return "none"  # the openai client wants some key; a server without --api-key ignores it
    value = os.environ.get(variable)
    if not value:
        raise UserInputError(f"--api-key-env {variable}: that environment variable is not set or empty")
    return value


def _summary(row: dict) -> str:
    parts = [f"feature {row['feature']}: {row['label']!r}" if row["label"] else
             f"feature {row['feature']}: the explainer gave no label (nothing scored)"]
    if row["detection"]:
        det = row["detection"]
        parts.append(f"detection {det['accuracy']:.2f} ({det['n_unparsed']} unparsed)")
    if row["simulation"]:
        sim = row["simulation"]
        r = "undefined" if sim["correlation"] is None else f"{sim['correlation']:.2f}"
        parts.append(f"simulation r {r} ({sim['n_unparsed']}/{sim['n_contexts']} unparsed)")
    return "; ".join(parts)


__all__ = ["explain"]
