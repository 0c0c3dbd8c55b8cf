"""Output folders of the toy models (JSON + safetensors + PNG, readable without interplab).

Every file goes through `interplab.files`; a run folder is built in a temporary sibling and
swapped in whole (`run_folder`), so a run that fails or is killed leaves the previous results
(or nothing), never a summary that disagrees with its weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from interplab.figures import save_png
from interplab.files import atomic_folder, check_replaceable, load_tensors, save_tensors, write_json

__all__ = ["FORMAT_VERSION", "load_tensors", "run_folder", "save_figure", "save_tensors", "write_json"]

FORMAT_VERSION = 1


@contextlib.contextmanager
def run_folder(out: str | Path, what: str = "toy run folder") -> Iterator[Path]:
    """Build a run folder in a temporary sibling of `out` and swap it in whole on success.
    An existing non-empty folder is replaced only if it is a run folder itself."""
    out = Path(out)
    check_replaceable(out, _is_run_folder, what)
    with atomic_folder(out) as tmp:
        yield tmp


def _is_run_folder(folder: Path) -> bool:
    return (folder / "summary.json").is_file() or (folder / "config.json").is_file()


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib Figure as PNG, atomically. Figures are made with `matplotlib.figure.Figure`
    (not pyplot), so nothing global needs closing and a notebook's backend is left alone."""
    save_png(fig, path, dpi=dpi, bbox_inches="tight")
