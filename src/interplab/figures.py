"""Figures drawn on explicit `matplotlib.figure.Figure` objects.

No pyplot: nothing is registered in pyplot's global figure list and `matplotlib.use(...)` is
never called, so a notebook's backend and open figures are left as the user set them.
Saving goes through `interplab.files` (atomic, umask-respecting).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from interplab.files import write_bytes


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **kwargs: Any):
    """(figure, axes) like `pyplot.subplots`, on a new Figure that pyplot does not track."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def colormap(name: str):
    """A registered colormap by name (what `pyplot.get_cmap` returns)."""
    import matplotlib

    return matplotlib.colormaps[name]


def save_png(fig, path: str | os.PathLike, *, dpi: int = 110, **kwargs: Any) -> Path:
    """Render `fig` as PNG and write it atomically to `path`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **kwargs)
    return write_bytes(path, buffer.getvalue())
