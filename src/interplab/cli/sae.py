"""`interplab sae ...`: train, evaluate, read and steer with sparse-autoencoder features.

Every command imports torch and interplab's heavy modules inside its body, so
`interplab --help` stays fast. User errors end with a message and exit code 2.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True)

SaePath = Annotated[Path, typer.Argument(help="An SAE folder (interplab, SAELens or sparsify layout).")]
IndexPath = Annotated[Path, typer.Argument(help="A feature index written by `interplab sae features`.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model alias, folder or Hub id (default: the one the SAE was trained on).")]
SiteOpt = Annotated[Optional[str], typer.Option(help="Site the SAE reads (default: the one in its config).")]
CorpusOpt = Annotated[str, typer.Option(help="Text/JSONL file, folder of them, or (online) a HF dataset name.")]


@contextmanager
def _user_errors():
    """Turn mistakes in the user's input into a one-line message and exit code 2."""
    from interplab.sae.formats import SAEFormatError

    try:
        yield
    except (ValueError, SAEFormatError, ImportError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


def _load_model(name: str | None, sae=None):
    from interplab.cli.core import _load

    chosen = name or (sae.cfg.model_id if sae is not None else None)
    if not chosen:
        typer.echo("error: the SAE does not say which model it was trained on; pass --model", err=True)
        raise typer.Exit(2)
    return _load(chosen)


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
    site: Annotated[str, typer.Option(help="Site to read, e.g. blocks.6.hook_resid_post.")],
    corpus: CorpusOpt,
    out: Annotated[Path, typer.Option(help="Output folder: the SAE goes to OUT/sae, logs and checkpoints beside it.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model alias, folder or Hub id.")] = "smollm2-135m-instruct",
    family: Annotated[str, typer.Option(help="relu, topk, batchtopk or jumprelu.")] = "topk",
    d_sae: Annotated[Optional[int], typer.Option(help="Latents (default: 8 x the site's width).")] = None,
    k: Annotated[Optional[int], typer.Option(help="Active latents per token (topk, batchtopk).")] = 32,
    steps: Annotated[int, typer.Option(help="Optimiser steps (one batch each).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Tokens per batch.")] = 4096,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: 2e-4 / sqrt(d_sae / 2^14)).")] = None,
    context_length: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    buffer_tokens: Annotated[int, typer.Option(help="Rows in the shuffling buffer.")] = 65_536,
    harvest: Annotated[Optional[Path], typer.Option(help="Harvest to this folder first (resumable), then train from it.")] = None,
    n_tokens: Annotated[Optional[int], typer.Option(help="Tokens to read from the corpus per pass (default: all).")] = None,
    dead_after_tokens: Annotated[int, typer.Option(help="A latent silent for this many tokens is dead (AuxK revives it).")] = 10_000_000,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in OUT.")] = False,
    seed: int = 0,
    precision: Annotated[str, typer.Option(help="float32, bf16 (autocast) or tf32 (CUDA matmuls); weights stay float32.")] = "float32",
    device: Annotated[Optional[str], typer.Option(help="Training device (default: cuda when present; under torchrun each rank takes its own GPU).")] = None,
    distribute_sites: Annotated[bool, typer.Option(help="Several sites (comma-separated --site): under torchrun each rank trains some sites' SAEs.")] = False,
) -> None:
    """Harvest activations from a corpus and train an SAE on them (under `torchrun`, data parallel:
    each process reads its share of the corpus; see docs/scaling.md)."""
    import torch

    from interplab.sae import parallel
    from interplab.sae.config import SAEConfig
    from interplab.sae.store import ActivationStore, StoreConfig, harvest_to_disk, site_width
    from interplab.sae.train import TrainConfig, train_saes

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    group = parallel.init_from_env(device)
    handle = _load_model(model)
    with _user_errors():
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
    model: ModelOpt = None,
    site: SiteOpt = None,
    n_contexts: Annotated[int, typer.Option(help="Windows to evaluate on.")] = 64,
    skip_contexts: Annotated[int, typer.Option(help="Skip this many windows first (e.g. those trained on).")] = 0,
    context_length: int = 128,
    ablation: Annotated[str, typer.Option(help="zero or mean: the baseline of CE loss recovered.")] = "zero",
    batch_size: int = 8,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Activation metrics (MSE, FVU, L0, dead/dense) and downstream metrics (CE loss recovered, KL)."""
    import json

    from rich.table import Table

    from interplab.sae.downstream import evaluate_downstream
    from interplab.sae.store import corpus_windows

    with _user_errors():
        sae = _load_sae(sae_path, site)
    handle = _load_model(model, sae)
    with _user_errors():
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
    sae_path: SaePath,
    corpus: CorpusOpt,
    out: Annotated[Path, typer.Option(help="SQLite file to write.")] = Path("features.db"),
    model: ModelOpt = None,
    site: SiteOpt = None,
    n_contexts: Annotated[int, typer.Option(help="Windows to index.")] = 1024,
    context_length: int = 64,
    n_top: Annotated[int, typer.Option(help="Top contexts kept per latent.")] = 20,
    batch_size: int = 16,
    fold_norm: Annotated[bool, typer.Option(help="Fold the final norm's weight into logit effects.")] = True,
) -> None:
    """Build the feature index: top contexts, histograms, density, logit effects and labels."""
    from interplab.sae.features import build_feature_index

    with _user_errors():
        sae = _load_sae(sae_path, site)
    handle = _load_model(model, sae)
    with _user_errors():
        index = build_feature_index(handle, sae, corpus, out, site=site, n_contexts=n_contexts,
                                    context_length=context_length, n_top=n_top, batch_size=batch_size,
                                    fold_norm=fold_norm, sae_path=str(Path(sae_path).resolve()), progress=True)
    alive = index.db.execute("SELECT COUNT(*) FROM features WHERE fire_count > 0").fetchone()[0]
    _console().print(f"indexed {index.meta['n_tokens']} tokens; {alive} of {index.d_sae} latents fired; wrote {out}")
    index.close()


@app.command("inspect")
def inspect_(
    sae_path: SaePath,
    text: Annotated[str, typer.Argument(help="The text to look at.")],
    model: ModelOpt = None,
    site: SiteOpt = None,
    k: Annotated[int, typer.Option(help="Latents shown per token.")] = 5,
    index: Annotated[Optional[Path], typer.Option(help="A feature index, to show labels.")] = None,
) -> None:
    """Which latents fire on each token of a text."""
    from rich.table import Table

    from interplab.sae.features import FeatureIndex, inspect

    with _user_errors():
        sae = _load_sae(sae_path, site)
        labels = FeatureIndex(index, sae=sae) if index is not None else None
    handle = _load_model(model, sae)
    with _user_errors():
        rows = inspect(handle, sae, text, k=k, site=site)
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
    query: Annotated[str, typer.Argument(help="Words to look for in labels and top contexts.")],
    limit: int = 20,
) -> None:
    """Latents whose label or top contexts mention QUERY."""
    from rich.table import Table

    from interplab.sae.features import FeatureIndex

    with _user_errors(), FeatureIndex(index) as idx:
        hits = idx.search(query, limit=limit)
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
    feature: Annotated[int, typer.Argument(help="Latent id.")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file (default: feature_<id>.html).")] = None,
    n_contexts: int = 20,
) -> None:
    """Write an HTML card for one latent: top contexts, logit effects, histogram."""
    from interplab.sae.card import write_feature_card

    with _user_errors():
        path = write_feature_card(index, feature, out or Path(f"feature_{feature}.html"), n_contexts=n_contexts)
    _console().print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# steering
# --------------------------------------------------------------------------------------------


@app.command("steer")
def steer(
    sae_path: SaePath,
    feature: Annotated[int, typer.Option(help="Latent id.")],
    prompt: Annotated[list[str], typer.Option(help="A prompt (repeat for several).")],
    method: Annotated[str, typer.Option(help="steer (add alpha*d_i), clamp (set to alpha), ablate, or bias (logit bias).")] = "steer",
    alpha: Annotated[float, typer.Option(help="Steer: latent units; clamp: the value; bias: nats on the top token.")] = 10.0,
    only_when_active: Annotated[bool, typer.Option(help="bias: only where the latent fires on the current token.")] = False,
    model: ModelOpt = None,
    site: SiteOpt = None,
    max_new_tokens: int = 40,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat")] = None,
) -> None:
    """Generate with and without a feature intervention, side by side."""
    from transformers import LogitsProcessorList

    from interplab.generation import generate
    from interplab.interventions import intervene
    from interplab.sae.downstream import resolve_sae_site
    from interplab.sae.steer import FeatureLogitBias, ablate_feature, clamp_feature, steer_feature

    with _user_errors():
        sae = _load_sae(sae_path, site)
    handle = _load_model(model, sae)
    kwargs = dict(max_new_tokens=max_new_tokens, chat=chat)
    with _user_errors():
        resolved = resolve_sae_site(handle, sae, site)
        clean = generate(handle, prompt, **kwargs)
        if method == "bias":
            bias = FeatureLogitBias(handle, sae, feature, alpha=alpha, only_when_active=only_when_active, site=site)
            with bias:
                steered = generate(handle, prompt, logits_processor=LogitsProcessorList([bias]), **kwargs)
        else:
            fns = {"steer": lambda: steer_feature(sae, feature, alpha=alpha),
                   "clamp": lambda: clamp_feature(sae, feature, alpha),
                   "ablate": lambda: ablate_feature(sae, feature)}
            if method not in fns:
                raise ValueError(f"method must be steer, clamp, ablate or bias; got {method!r}")
            with intervene(handle, {resolved.name: fns[method]()}):
                steered = generate(handle, prompt, **kwargs)
    console = _console()
    for text, before, after in zip(prompt, clean, steered):
        console.rule(repr(text))
        console.print(f"[bold]clean[/bold]    {before}")
        console.print(f"[bold]{method}[/bold]    {after}")


@app.command("compare-steering")
def compare_steering(
    sae_path: SaePath,
    feature: Annotated[int, typer.Option(help="Latent id.")],
    neutral: Annotated[str, typer.Option(help="Neutral text (file/folder) for the damage measure.")],
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt (repeat for several).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A file with one prompt per line.")] = None,
    target: Annotated[Optional[list[str]], typer.Option(help="Target-concept token (repeat); default: the latent's top promoted tokens.")] = None,
    model: ModelOpt = None,
    site: SiteOpt = None,
    n_contexts: Annotated[int, typer.Option(help="Neutral windows.")] = 16,
    context_length: int = 64,
) -> None:
    """Target-concept probability gain vs damage (CE on neutral text) for activation steering,
    clamping and the logit bias, side by side."""
    from rich.table import Table

    from interplab.sae.steer import compare_steering as run_compare
    from interplab.sae.store import corpus_windows

    with _user_errors():
        prompts = list(prompt or [])
        if prompts_file is not None:
            prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("give prompts with --prompt or --prompts-file")
        sae = _load_sae(sae_path, site)
    handle = _load_model(model, sae)
    with _user_errors():
        windows = corpus_windows(handle, neutral, context_length=context_length, n_contexts=n_contexts)
        result = run_compare(handle, sae, feature, prompts, windows, site=site, target_tokens=target)
    table = Table(title=f"latent {feature} at {result.site}: targets {' '.join(repr(t) for t in result.target_tokens[:10])}")
    for column in ("method", "strength", "P(target)", "gain", "neutral CE", "damage", "gain / damage"):
        table.add_column(column, justify="right" if column != "method" else "left", no_wrap=column == "method")
    table.add_row("clean", "", f"{result.clean_target_prob:.4f}", "", f"{result.clean_neutral_ce:.4f}", "", "")
    for r in result.results:
        ratio = f"{r.target_gain / r.damage:.3f}" if r.damage > 1e-6 else "-"
        table.add_row(r.method, f"{r.strength:.3g}", f"{r.target_prob:.4f}", f"{r.target_gain:+.4f}",
                      f"{r.neutral_ce:.4f}", f"{r.damage:+.4f}", ratio)
    console = _console()
    console.print(table)
    console.print(f"steer/clamp strengths are multiples of the latent's max activation on the neutral text "
                  f"({result.max_activation:.3g}); logit-bias strengths are nats added to its top token.")
from interplab.cli import decomp  # noqa: E402,F401  registers bench/transcoders/graph on this app
