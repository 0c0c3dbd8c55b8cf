"""The `interplab` command line. Every command imports torch inside its body,
so `interplab --help` answers without loading it."""

from __future__ import annotations

import typer

from interplab.cli import analysis, core, sae, steer, toy

app = typer.Typer(
    name="interplab",
    help="Look inside a Hugging Face causal LM and change what it does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

core.register(app)
steer.register(app)
analysis.register(app)
app.add_typer(sae.app, name="sae", help="Sparse autoencoders: train, evaluate, read and steer with features.")
app.add_typer(toy.app, name="toy", help="Toy models: superposition and grokking.")


def main() -> None:
    app()
