"""The `interplab` command line. Every command imports torch inside its body,
so `interplab --help` answers without loading it. The conventions all commands follow
are in docs/cli.md; the one error path is in `interplab.cli.errors`."""

from __future__ import annotations

from typing import Annotated

import typer

from interplab.cli import analysis, core, sae, serve, steer, toy
from interplab.cli.errors import InterplabGroup

app = typer.Typer(
    name="interplab",
    cls=InterplabGroup,
    help="Look inside a Hugging Face causal LM and change what it does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> bool:
    """--version's callback: what it returns becomes the option's value (typer passes it to _root)."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"interplab {version('interplab')}")
        except PackageNotFoundError:
            typer.echo("interplab (not installed: running from a source tree)")
        raise typer.Exit()
    return value


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", callback=_print_version, is_eager=True)] = False) -> None:
    """Look inside a Hugging Face causal LM and change what it does."""


core.register(app)
steer.register(app)
analysis.register(app)
serve.register(app)
app.add_typer(sae.app, name="sae", help="Sparse autoencoders: train, evaluate, read and steer with features.")
app.add_typer(toy.app, name="toy", help="Toy models: superposition and grokking.")


def main() -> None:
    app()
