"""`interplab models`, `interplab info`, `interplab generate`."""

from __future__ import annotations

from typing import Annotated

import typer

from interplab.cli.options import (
    DEFAULT_MODEL, MAX_NEW_TOKENS, ChatOpt, MaxNewTokensOpt, ModelOpt, SeedOpt, check_positive,
)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("info")(info)
    app.command("generate")(generate)


def models() -> None:
    """List the built-in model aliases and whether each can be loaded here."""
    from rich.console import Console
    from rich.table import Table

    from interplab.models.loading import ALIASES, alias_available, cache_root

    table = Table(title="interplab model aliases")
    for column in ("alias", "description", "available here"):
        table.add_column(column)
    for alias in ALIASES.values():
        table.add_row(alias.name, alias.description, alias_available(alias))
    console = Console()
    console.print(table)
    console.print(f"cache: {cache_root()}")


def info(model: ModelOpt = DEFAULT_MODEL,
         sites: Annotated[bool, typer.Option(help="List every site name.")] = False) -> None:
    """Layers, widths, heads and sites of a model."""
    from rich.console import Console
    from rich.table import Table

    handle = load_model(model)
    table = Table(title=handle.model_id, show_header=False)
    for key, value in handle.describe().items():
        table.add_row(key, str(value))
    console = Console()
    console.print(table)
    n = handle.n_layers - 1
    console.print(f"sites: hook_embed, blocks.{{0..{n}}}.{{hook_resid_pre, hook_resid_mid, hook_resid_post, "
                  "hook_attn_out, hook_mlp_out, attn.hook_z, attn.hook_pattern, mlp.hook_post}, "
                  "ln_final.hook_normalized" + (" (no hook_resid_mid: parallel blocks)" if handle.arch.parallel else ""))
    if sites:
        for name in handle.site_names():
            console.print(name)


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt.", show_default=False)],
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    chat: ChatOpt = None,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample).")] = 1.0,
    seed: SeedOpt = 0,
) -> None:
    """Continue a prompt, streaming the text (chat template on when the model has one)."""
    from interplab.errors import UserInputError
    from interplab.generation import generate as run_generate

    if not prompt.strip():
        raise UserInputError("the prompt is empty: give the text to continue, e.g. interplab generate \"Once upon a time\"")
    check_positive(max_new_tokens, "--max-new-tokens")
    if temperature <= 0:
        raise UserInputError(f"--temperature must be > 0, got {temperature}")
    handle = load_model(model)
    run_generate(handle, prompt, max_new_tokens=max_new_tokens, chat=chat, do_sample=sample,
                 temperature=temperature, seed=seed, stream=True)


def load_model(name: str):
    """Load with a spinner on stderr; a bad name raises a user error (one line, exit 2)."""
    from rich.console import Console

    from interplab.models.loading import load

    with Console(stderr=True).status(f"loading {name} ..."):
        return load(name)
