"""CLI commands (placeholder module: commands are registered here as they are built)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
