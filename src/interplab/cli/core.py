"""`interplab models`, `interplab info`, `interplab generate`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelArg = Annotated[str, typer.Argument(help="An alias (see `interplab models`), a local HF folder or a Hub id.")]


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


def info(model: ModelArg = "smollm2-135m-instruct",
         sites: Annotated[bool, typer.Option(help="List every site name.")] = False) -> None:
    """Layers, widths, heads and sites of a model."""
    from rich.console import Console
    from rich.table import Table

    handle = _load(model)
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
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 40,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Apply the chat template (default: when the model has one).")] = None,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> None:
    """Continue a prompt, streaming the text."""
    from interplab.generation import generate as run_generate

    handle = _load(model)
    run_generate(handle, prompt, max_new_tokens=max_new_tokens, chat=chat, do_sample=sample,
                 temperature=temperature, seed=seed, stream=True)


def _load(name: str):
    """Load with a spinner, turning user errors into a clean message and exit code 2."""
    from rich.console import Console

    from interplab.models.loading import load

    try:
        with Console(stderr=True).status(f"loading {name} ..."):
            return load(name)
    except (ValueError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
