"""`interplab sae ...`: train, evaluate, read and steer with sparse-autoencoder features.

Every command imports torch and interplab's heavy modules inside its body, so
`interplab --help` stays fast. User errors end with a message and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from interplab.cli.core import load_model
from interplab.cli.options import (
    CONTEXT_LENGTH, DEFAULT_MODEL, MAX_NEW_TOKENS, ArtifactModelOpt, ChatOpt, MaxNewTokensOpt, OverwriteOpt,
    SeedOpt, check_choice, check_positive, config_n_layers, prepare_out,
)
from interplab.cli.options import ModelOpt as TrainModelOpt
from interplab.errors import UserInputError

app = typer.Typer(no_args_is_help=True)

SaePath = Annotated[Path, typer.Argument(help="An SAE folder (interplab, SAELens or sparsify layout).",
                                         show_default=False)]
IndexPath = Annotated[Path, typer.Argument(help="A feature index written by `interplab sae features`.",
                                           show_default=False)]
SiteOpt = Annotated[Optional[str], typer.Option(help="Site the SAE reads. [default: the one in its config]",
                                                show_default=False)]
CorpusOpt = Annotated[str, typer.Option(help="Text/JSONL file, folder of them, or (online) a HF dataset name.",
                                        show_default=False)]
ContextLengthOpt = Annotated[int, typer.Option(help="Tokens per corpus window (each starts with BOS).")]
NContextsOpt = Annotated[int, typer.Option(help="Corpus windows to use.")]
BatchOpt = Annotated[int, typer.Option(help="Windows per forward pass.")]
FeatureOpt = Annotated[int, typer.Option(help="Latent id.", show_default=False)]
PromptsOpt = Annotated[list[str], typer.Option(help="A prompt (repeat for several).", show_default=False)]
STEER_METHODS = ("steer", "clamp", "ablate", "bias")
ModelOpt = ArtifactModelOpt  # --model/-m, default: the model the SAE was trained on (also used by cli/decomp.py)


def _user_errors():
    """Kept for cli/decomp.py: user errors are handled once, for every command, in cli/errors.py."""
    import contextlib

    return contextlib.nullcontext()


def _load_model(name: str | None, sae=None):
    chosen = name or (sae.cfg.model_id if sae is not None else None)
    if not chosen:
        raise UserInputError("the SAE (or transcoder) does not say which model it was trained on; pass --model")
    return load_model(chosen)


def _check_site_early(site: str, model: str) -> None:
    """Refuse a malformed site (or a layer out of range) before the model loads."""
    from interplab.sites import parse_site

    n_layers = config_n_layers(model)
    parse_site(site, n_layers if n_layers is not None else 10**9)


def _check_feature(sae, feature: int) -> None:
    """Refuse a latent index the SAE does not have, before the model loads."""
    d_sae = sae.cfg.d_sae
    if not 0 <= feature < d_sae:
        raise UserInputError(f"feature {feature} is out of range: this SAE has {d_sae} latents "
                             f"(valid 0..{d_sae - 1})")


def _load_sae(path: Path, site: str | None = None):
    from interplab.sae.formats import load_sae

    sae = load_sae(path, site=site)
    sae.eval()
    return sae


def _console():
    from rich.console import Console

    return Console()


# --------------------------------------------------------------------------------------------
# train / eval
# --------------------------------------------------------------------------------------------


@app.command("train")
def train(
    site: Annotated[str, typer.Option(help="Site to read, e.g. blocks.6.hook_resid_post.", show_default=False)],
    corpus: CorpusOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the SAE goes to OUT/sae, logs and "
                                                          "checkpoints beside it.", show_default=False)],
    model: TrainModelOpt = DEFAULT_MODEL,
    family: Annotated[str, typer.Option(help="relu, topk, batchtopk or jumprelu.")] = "topk",
    d_sae: Annotated[Optional[int], typer.Option(help="Latents. [default: 8 x the site's width]",
                                                 show_default=False)] = None,
    k: Annotated[Optional[int], typer.Option(help="Active latents per token (topk, batchtopk).")] = 32,
    steps: Annotated[int, typer.Option(help="Optimiser steps (one batch each).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Tokens per batch.")] = 4096,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. [default: 2e-4 / sqrt(d_sae / 2^14)]",
                                                show_default=False)] = None,
    context_length: ContextLengthOpt = CONTEXT_LENGTH,
    buffer_tokens: Annotated[int, typer.Option(help="Rows in the shuffling buffer.")] = 65_536,
    harvest: Annotated[Optional[Path], typer.Option(help="Harvest to this folder first (resumable), then train "
                                                         "from it.", show_default=False)] = None,
    n_tokens: Annotated[Optional[int], typer.Option(help="Tokens to read from the corpus per pass, exactly. "
                                                         "[default: all]", show_default=False)] = None,
    dead_after_tokens: Annotated[int, typer.Option(help="A latent silent for this many tokens is dead (AuxK "
                                                        "revives it).")] = 10_000_000,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in OUT.")] = False,
    seed: SeedOpt = 0,
    precision: Annotated[str, typer.Option(help="float32, bf16 (autocast) or tf32 (CUDA matmuls); weights stay float32.")] = "float32",
    device: Annotated[Optional[str], typer.Option(help="Training device (default: cuda when present; under torchrun each rank takes its own GPU).")] = None,
    distribute_sites: Annotated[bool, typer.Option(help="Several sites (comma-separated --site): under torchrun each rank trains some sites' SAEs.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Harvest activations from a corpus and train an SAE on them (under `torchrun`, data parallel:
    each process reads its share of the corpus; see docs/scaling.md).

    TinyStories-656K, 1000 steps of 1024 tokens: under a minute of CPU time."""
    import torch

    from interplab.sae import parallel
    from interplab.sae.config import SAEConfig
    from interplab.sae.store import ActivationStore, StoreConfig, harvest_to_disk, site_width
    from interplab.sae.train import TrainConfig, train_saes

    check_choice(family, "--family", ("relu", "topk", "batchtopk", "jumprelu"))
    for value, option in ((steps, "--steps"), (batch_size, "--batch-size"), (context_length, "--context-length"),
                          (n_tokens, "--n-tokens"), (d_sae, "--d-sae")):
        check_positive(value, option)
    for one_site in site.split(",") if distribute_sites else [site]:
        _check_site_early(one_site.strip(), model)
    if out.exists() and not resume:
        prepare_out(out, overwrite)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    group = parallel.init_from_env(device)
    handle = _load_model(model)
    sites = [handle.site(s.strip()).name for s in site.split(",")] if distribute_sites else [handle.site(site).name]
    sae_cfgs = {}
    for name in sites:
        width = site_width(handle, name)
        sae_cfgs[name if distribute_sites else "sae"] = SAEConfig(
            d_in=width, d_sae=d_sae or 8 * width, family=family, k=k if family in ("topk", "batchtopk") else None,
            site=name, model_id=handle.model_id)
    store_cfg = StoreConfig(sites=tuple(sites), context_length=context_length, batch_size=batch_size,
                            buffer_tokens=max(buffer_tokens, 2 * batch_size), seed=seed)
    train_cfg = TrainConfig(n_steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                            dead_after_tokens=dead_after_tokens, precision=precision, device=device,
                            progress=group.is_writer, tensorboard=True)
    share = (group.rank, group.world_size)
    if harvest is not None:
        harvest_to_disk(handle, corpus, harvest, store_cfg, n_tokens=n_tokens, progress=True)
        store = ActivationStore.from_disk(harvest, sites=sites, batch_size=batch_size, share=share,
                                          buffer_tokens=store_cfg.buffer_tokens, seed=seed, repeat=True)
    else:
        share_tokens = None if n_tokens is None else -(-n_tokens // group.world_size)
        store = ActivationStore.from_corpus(handle, corpus, store_cfg, max_tokens=share_tokens, repeat=True,
                                            share=share)
    try:
        if distribute_sites:
            batches = ({s: chunk.acts[s] for s in sites} for chunk in store)
            parallel.train_distributed_sites(sae_cfgs, batches, train_cfg, out_dir=out, resume=resume, group=group)
        else:
            train_saes(sae_cfgs, store.batches(sites[0]), train_cfg, out_dir=out, resume=resume, group=group)
    except parallel.RankFailure as error:  # not the user's mistake, but no traceback either
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if group.is_writer:
        where = out / "rank_*" if distribute_sites else out / "sae"
        _console().print(f"SAE saved to {where} ({store.tokens_read} activation rows read by rank 0 of "
                         f"{group.world_size}); evaluate it with `interplab sae eval {where} --corpus ...`")


@app.command("eval")
def eval_(
    sae_path: SaePath,
    corpus: CorpusOpt,
    model: ArtifactModelOpt = None,
    site: SiteOpt = None,
    n_contexts: NContextsOpt = 64,
    skip_contexts: Annotated[int, typer.Option(help="Skip this many windows first (e.g. those trained on).")] = 0,
    context_length: ContextLengthOpt = CONTEXT_LENGTH,
    ablation: Annotated[str, typer.Option(help="zero or mean: the baseline of CE loss recovered.")] = "zero",
    batch_size: BatchOpt = 8,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Activation metrics (MSE, FVU, L0, dead/dense) and downstream metrics (CE loss recovered, KL)."""
    import json

    from rich.table import Table

    from interplab.sae.downstream import evaluate_downstream
    from interplab.sae.store import corpus_windows

    check_choice(ablation, "--ablation", ("zero", "mean"))
    for value, option in ((n_contexts, "--n-contexts"), (context_length, "--context-length"),
                          (batch_size, "--batch-size")):
        check_positive(value, option)
    sae = _load_sae(sae_path, site)
    handle = _load_model(model, sae)
    windows = corpus_windows(handle, corpus, context_length=context_length, n_contexts=n_contexts,
                             skip_contexts=skip_contexts)
    result = evaluate_downstream(handle, sae, windows, site=site, ablation=ablation, batch_size=batch_size,
                                 progress=not json_out)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=f"{sae_path} at {result.site} on {handle.model_id}")
    for column in ("metric", "value", "meaning"):
        table.add_column(column)
    for row in result.rows():
        table.add_row(*row)
    _console().print(table)


# --------------------------------------------------------------------------------------------
# features, inspect, search, card
# --------------------------------------------------------------------------------------------


@app.command("features")
def features(
    sae_path: Annotated[Path, typer.Argument(help="An SAE folder (interplab, SAELens or sparsify layout), or a "
                                                  "transcoder set folder (`interplab sae transcoders`) with --layers.",
                                             show_default=False)],
    corpus: CorpusOpt,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The SQLite file to write. [default: features.db; "
                                                "for a transcoder set, FOLDER/features-<L>.db per layer, where "
                                                "`interplab serve --transcoders` finds it]", show_default=False)] = None,
    model: ArtifactModelOpt = None,
    site: SiteOpt = None,
    layers: Annotated[Optional[str], typer.Option(help="Transcoder sets only: the layers to index, comma-separated "
                                                       "or 'all' (one index and one corpus pass each).",
                                                  show_default=False)] = None,
    n_contexts: NContextsOpt = 1024,
    context_length: ContextLengthOpt = CONTEXT_LENGTH,
    n_top: Annotated[int, typer.Option(help="Top contexts kept per latent.")] = 20,
    batch_size: BatchOpt = 16,
    fold_norm: Annotated[bool, typer.Option(help="Fold the final norm's weight into logit effects.")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Build the feature index: top contexts, histograms, density, logit effects and labels, of an
    SAE's latents or of a transcoder set's layers."""
    from interplab.sae.features import build_feature_index

    for value, option in ((n_contexts, "--n-contexts"), (context_length, "--context-length"), (n_top, "--n-top"),
                          (batch_size, "--batch-size")):
        check_positive(value, option)
    jobs = _index_jobs(sae_path, site, layers, out)
    for _, path in jobs:
        prepare_out(path, overwrite)
    handle = _load_model(model, jobs[0][0])
    for source, path in jobs:
        index = build_feature_index(handle, source, corpus, path, site=site, n_contexts=n_contexts,
                                    context_length=context_length, n_top=n_top, batch_size=batch_size,
                                    fold_norm=fold_norm, sae_path=str(Path(sae_path).resolve()), progress=True)
        alive = index.db.execute("SELECT COUNT(*) FROM features WHERE fire_count > 0").fetchone()[0]
        _console().print(f"indexed {index.meta['n_tokens']} tokens; {alive} of {index.d_sae} latents fired; wrote {path}")
        index.close()


def _index_jobs(path: Path, site: str | None, layers: str | None, out: Path | None) -> list[tuple]:
    """[(the SAE or transcoder to index, the file to write)], checked before the model loads."""
    from interplab.sae.features import transcoder_index_path
    from interplab.sae.transcoder import SET_FILE

    if not (path / SET_FILE).is_file():
        if layers is not None:
            raise UserInputError(f"--layers is for a transcoder set folder (one with {SET_FILE}); {path} is not one. "
                                 "An SAE reads the site in its config (or --site)")
        return [(_load_sae(path, site), out or Path("features.db"))]
    if site is not None:
        raise UserInputError("--site is for SAEs: a transcoder reads the MLP input of its layer; give --layers")
    transcoders = _set_transcoders(path, layers)
    if out is not None and len(transcoders) > 1:
        raise UserInputError(f"--out names one file, but {len(transcoders)} layers are indexed; leave --out out "
                             "(each goes to FOLDER/features-<L>.db) or give one layer")
    return [(tc, out or transcoder_index_path(path, layer)) for layer, tc in transcoders.items()]


def _set_transcoders(folder: Path, layers: str | None) -> dict:
    from interplab.cli.decomp import _ints
    from interplab.files import read_json_object
    from interplab.sae.transcoder import SET_FILE, load_transcoder

    known = [int(L) for L in read_json_object(folder / SET_FILE, what="transcoder set").get("layers", [])]
    if layers is None:
        raise UserInputError(f"pass --layers (e.g. --layers all): the transcoder set {folder} has layers {known}")
    chosen = known if layers.strip() == "all" else _ints(layers, "--layers", minimum=0)
    missing = sorted(set(chosen) - set(known))
    if missing:
        raise UserInputError(f"--layers {layers}: layers {missing} are not in the transcoder set {folder}, "
                             f"which has layers {known}")
    return {layer: load_transcoder(folder / f"layer_{layer}") for layer in dict.fromkeys(chosen)}


@app.command("inspect")
def inspect_(
    sae_path: SaePath,
    text: Annotated[str, typer.Argument(help="The text to look at.", show_default=False)],
    model: ArtifactModelOpt = None,
    site: SiteOpt = None,
    top_k: Annotated[int, typer.Option(help="Latents shown per token.")] = 5,
    index: Annotated[Optional[Path], typer.Option(help="A feature index, to show labels.", show_default=False)] = None,
) -> None:
    """Which latents fire on each token of a text."""
    from rich.table import Table

    from interplab.sae.features import FeatureIndex, inspect

    check_positive(top_k, "--top-k")
    if not text.strip():
        raise UserInputError("the text is empty: give the text to look at")
    sae = _load_sae(sae_path, site)
    labels = FeatureIndex(index, sae=sae) if index is not None else None
    handle = _load_model(model, sae)
    rows = inspect(handle, sae, text, k=top_k, site=site)
    table = Table(title=f"latents per token ({sae_path})")
    for column in ("pos", "token", "latents (activation)"):
        table.add_column(column)
    for row in rows:
        cells = [f"{f} ({v:.2f})" + (f" {labels.summary(f).label}" if labels else "") for f, v in row.features]
        table.add_row(str(row.position), repr(row.token), "\n".join(cells) if labels else ", ".join(cells))
    _console().print(table)


@app.command("search")
def search(
    index: IndexPath,
    query: Annotated[str, typer.Argument(help="Words to look for in labels and top contexts.", show_default=False)],
    n_results: Annotated[int, typer.Option(help="Latents listed at most.")] = 20,
) -> None:
    """Latents whose label or top contexts mention QUERY."""
    from rich.table import Table

    from interplab.sae.features import FeatureIndex

    check_positive(n_results, "--n-results")
    with FeatureIndex(index) as idx:
        hits = idx.search(query, limit=n_results)
    if not hits:
        _console().print(f"no latent mentions {query!r}")
        return
    table = Table(title=f"latents matching {query!r}")
    for column in ("latent", "score", "matched", "density", "label"):
        table.add_column(column)
    for hit in hits:
        table.add_row(str(hit.feature), f"{hit.score:.2f}", hit.matched, f"{hit.density:.3%}", hit.label)
    _console().print(table)


@app.command("card")
def card(
    index: IndexPath,
    feature: Annotated[int, typer.Argument(help="Latent id.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The HTML file to write. "
                                                "[default: feature_<id>.html]", show_default=False)] = None,
    n_contexts: Annotated[int, typer.Option(help="Top contexts shown.")] = 20,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write an HTML card for one latent: top contexts, logit effects, histogram."""
    from interplab.sae.card import write_feature_card

    check_positive(n_contexts, "--n-contexts")
    out = prepare_out(out or Path(f"feature_{feature}.html"), overwrite)
    path = write_feature_card(index, feature, out, n_contexts=n_contexts)
    _console().print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# steering
# --------------------------------------------------------------------------------------------


@app.command("steer")
def steer(
    sae_path: SaePath,
    feature: FeatureOpt,
    prompt: PromptsOpt,
    method: Annotated[str, typer.Option(help="steer (add scale * d_i), clamp (set the latent to scale), ablate, "
                                             "or bias (a logit bias).")] = "steer",
    scale: Annotated[float, typer.Option("--scale", "-s", help="steer: latent units; clamp: the value; bias: nats "
                                                               "on the top token.")] = 10.0,
    only_when_active: Annotated[bool, typer.Option(help="bias: only where the latent fires on the current "
                                                        "token.")] = False,
    model: ArtifactModelOpt = None,
    site: SiteOpt = None,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    chat: ChatOpt = None,
) -> None:
    """Generate with and without a feature intervention, side by side."""
    from transformers import LogitsProcessorList

    from interplab.generation import generate
    from interplab.interventions import intervene
    from interplab.sae.downstream import resolve_sae_site
    from interplab.sae.steer import FeatureLogitBias, ablate_feature, clamp_feature, steer_feature

    check_choice(method, "--method", STEER_METHODS)
    check_positive(max_new_tokens, "--max-new-tokens")
    sae = _load_sae(sae_path, site)
    _check_feature(sae, feature)
    handle = _load_model(model, sae)
    kwargs = dict(max_new_tokens=max_new_tokens, chat=chat)
    resolved = resolve_sae_site(handle, sae, site)
    clean = generate(handle, prompt, **kwargs)
    if method == "bias":
        bias = FeatureLogitBias(handle, sae, feature, scale=scale, only_when_active=only_when_active, site=site)
        with bias:
            steered = generate(handle, prompt, logits_processor=LogitsProcessorList([bias]), **kwargs)
    else:
        edits = {"steer": lambda: steer_feature(sae, feature, scale=scale),
                 "clamp": lambda: clamp_feature(sae, feature, scale),
                 "ablate": lambda: ablate_feature(sae, feature)}
        with intervene(handle, {resolved.name: edits[method]()}):
            steered = generate(handle, prompt, **kwargs)
    console = _console()
    for text, before, after in zip(prompt, clean, steered):
        console.rule(repr(text))
        console.print(f"[bold]clean[/bold]    {before}")
        console.print(f"[bold]{method}[/bold]    {after}")


@app.command("compare-steering")
def compare_steering(
    sae_path: SaePath,
    feature: FeatureOpt,
    neutral: Annotated[str, typer.Option(help="Neutral text (file/folder) for the damage measure.",
                                         show_default=False)],
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt (repeat for several).",
                                                        show_default=False)] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A file with one prompt per line.",
                                                         show_default=False)] = None,
    target: Annotated[Optional[list[str]], typer.Option(help="Target-concept token (repeat). [default: the "
                                                        "latent's top promoted tokens]", show_default=False)] = None,
    model: ArtifactModelOpt = None,
    site: SiteOpt = None,
    n_contexts: NContextsOpt = 16,
    context_length: ContextLengthOpt = CONTEXT_LENGTH,
) -> None:
    """Target-concept probability gain vs damage (CE on neutral text) for activation steering,
    clamping and the logit bias, side by side."""
    from rich.table import Table

    from interplab.files import read_text
    from interplab.sae.steer import compare_steering as run_compare
    from interplab.sae.store import corpus_windows

    check_positive(n_contexts, "--n-contexts")
    check_positive(context_length, "--context-length")
    prompts = list(prompt or [])
    if prompts_file is not None:
        prompts += [line.strip() for line in read_text(prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise UserInputError("give prompts with --prompt or --prompts-file")
    sae = _load_sae(sae_path, site)
    _check_feature(sae, feature)
    handle = _load_model(model, sae)
    windows = corpus_windows(handle, neutral, context_length=context_length, n_contexts=n_contexts)
    result = run_compare(handle, sae, feature, prompts, windows, site=site, target_tokens=target)
    table = Table(title=f"latent {feature} at {result.site}: targets {' '.join(repr(t) for t in result.target_tokens[:10])}")
    for column in ("method", "scale", "P(target)", "gain", "neutral CE", "damage", "gain / damage"):
        table.add_column(column, justify="right" if column != "method" else "left", no_wrap=column == "method")
    table.add_row("clean", "", f"{result.clean_target_prob:.4f}", "", f"{result.clean_neutral_ce:.4f}", "", "")
    for r in result.results:
        ratio = f"{r.target_gain / r.damage:.3f}" if r.damage > 1e-6 else "-"
        table.add_row(r.method, f"{r.scale:.3g}", f"{r.target_prob:.4f}", f"{r.target_gain:+.4f}",
                      f"{r.neutral_ce:.4f}", f"{r.damage:+.4f}", ratio)
    console = _console()
    console.print(table)
    console.print(f"steer/clamp strengths are multiples of the latent's max activation on the neutral text "
                  f"({result.max_activation:.3g}); logit-bias strengths are nats added to its top token.")
from interplab.cli import decomp  # noqa: E402,F401  registers bench/transcoders/graph on this app
