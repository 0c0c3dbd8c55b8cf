"""CLI command group (commands are added here as they are built)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
