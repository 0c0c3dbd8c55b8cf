"""Results as labelled grids: tables (CSV, JSON) and PNG heatmaps.

Every analysis in this package returns a `Grid`: a 2-D table of numbers with a
label per row and per column (layers x positions, layers x heads, ...). `save`
writes it atomically as `<stem>.csv`, `<stem>.json` and `<stem>.png`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.figures import subplots
from interplab.files import finite_json, write_bytes

FORMAT_VERSION = 1


@dataclass
class Grid:
    """A labelled table of numbers, e.g. the recovery of every (layer, position) patch."""

    values: Float[Tensor, "rows cols"]
    """The numbers shown (recovery, metric change, contribution ...); NaN where undefined."""
    row_labels: list[str]
    """One label per row (e.g. "blocks.3.hook_resid_pre" or "L3")."""
    col_labels: list[str]
    """One label per column (e.g. "5: Mary" or "H4")."""
    title: str = ""
    """What the grid shows, used as the plot title."""
    value_name: str = "value"
    """Name of the numbers (e.g. "recovery", "change in logit_diff")."""
    raw: Tensor | None = None
    """Optional second grid of the same shape (e.g. the metric before normalising)."""
    meta: dict = field(default_factory=dict)
    """JSON-able facts about the run (metric, clean and corrupted baselines, model ...)."""

    def __post_init__(self) -> None:
        rows, cols = self.values.shape
        if (rows, cols) != (len(self.row_labels), len(self.col_labels)):
            raise ValueError(f"grid values are {rows}x{cols} but there are {len(self.row_labels)} "
                             f"row and {len(self.col_labels)} column labels")

    def __repr__(self) -> str:
        rows, cols = self.values.shape
        best = self.top(1)
        peak = f"; largest {best[0][2]:+.3g} at ({best[0][0]}, {best[0][1]})" if best else ""
        return (f"Grid({self.title or self.value_name!r}: {rows} rows x {cols} columns{peak}; "
                ".top(k), .cell(row, col), .save(folder, name) for CSV/JSON/PNG)")

    def cell(self, row: str | int, col: str | int) -> float:
        """The value at a row and column given by label or index."""
        r = self.row_labels.index(row) if isinstance(row, str) else row
        c = self.col_labels.index(col) if isinstance(col, str) else col
        return float(self.values[r, c])

    def top(self, k: int = 10, *, largest: bool = True) -> list[tuple[str, str, float]]:
        """The k cells with the largest (or smallest) values, NaN skipped."""
        flat = self.values.flatten()
        order = torch.argsort(flat, descending=largest)
        cells = []
        for i in order.tolist():
            value = float(flat[i])
            if math.isnan(value):
                continue
            cells.append((self.row_labels[i // len(self.col_labels)], self.col_labels[i % len(self.col_labels)], value))
            if len(cells) == k:
                break
        return cells

    def to_csv(self) -> str:
        """Wide table: one line per row label, one column per column label."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["", *self.col_labels])
        for label, row in zip(self.row_labels, self.values.tolist()):
            writer.writerow([label, *(_fmt(v) for v in row)])
        return out.getvalue()

    def to_json(self) -> dict:
        data = {"format_version": FORMAT_VERSION, "title": self.title, "value_name": self.value_name,
                "rows": self.row_labels, "cols": self.col_labels, "values": _nan_to_none(self.values),
                "meta": self.meta}
        if self.raw is not None:
            data["raw"] = _nan_to_none(self.raw)
        return data

    def save(self, folder: str | Path, stem: str, *, plot: bool = True) -> dict[str, Path]:
        """Write `<stem>.csv`, `<stem>.json` and (with `plot`) `<stem>.png` into `folder`.

        All three are rendered in memory before the first is written, so a failure (a bad label,
        a plotting error) leaves the previous set untouched rather than a CSV that disagrees
        with its PNG."""
        folder = Path(folder)
        rendered = {"csv": self.to_csv().encode(), "json": _json_bytes(self.to_json())}
        if plot:
            rendered["png"] = _png_bytes(heatmap_figure(self))
        paths = {kind: folder / f"{stem}.{kind}" for kind in rendered}
        for kind, data in rendered.items():
            write_bytes(paths[kind], data)
        return paths


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def _nan_to_none(t: Tensor) -> list:
    return [[None if math.isnan(v) else v for v in row] for row in t.tolist()]


def write_json(path: str | Path, data: dict) -> None:
    """An analysis result as JSON with its format_version (NaN written as null)."""
    write_bytes(path, _json_bytes({"format_version": FORMAT_VERSION, **data}))


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(finite_json(data), indent=1, allow_nan=False) + "\n").encode()


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _figure(width_cells: int, height_cells: int):
    width = min(max(4.0, 0.45 * width_cells + 2.5), 40.0)
    height = min(max(3.0, 0.3 * height_cells + 1.5), 40.0)
    return subplots(figsize=(width, height))


def heatmap(grid: Grid, path: str | Path, *, annotate: list[list[str]] | None = None) -> Path:
    """`heatmap_figure` written atomically as PNG."""
    return _save_figure(heatmap_figure(grid, annotate=annotate), path)


def heatmap_figure(grid: Grid, *, annotate: list[list[str]] | None = None):
    """A heatmap Figure: diverging and centred at 0 (red positive, blue negative), or white-to-red
    when no value is negative. `annotate` puts a text in each cell (e.g. the logit lens's top token)."""
    rows, cols = grid.values.shape
    fig, ax = _figure(cols, rows)
    values = grid.values.float().numpy()
    finite = values[~(values != values)]  # drop NaN
    bound = float(abs(finite).max()) if finite.size else 1.0
    bound = bound or 1.0
    if finite.size and finite.min() >= 0:
        image = ax.imshow(values, cmap="Reds", vmin=0, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(cols), grid.col_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(rows), grid.row_labels, fontsize=7)
    ax.set_title(grid.title, fontsize=9)
    fig.colorbar(image, ax=ax, label=grid.value_name)
    if annotate is not None:
        for r, line in enumerate(annotate):
            for c, text in enumerate(line):
                ax.text(c, r, text, ha="center", va="center", fontsize=5)
    fig.tight_layout()
    return fig


def scatter(x: Tensor, y: Tensor, path: str | Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """A scatter plot with the y = x line (for attribution vs true patching)."""
    fig, ax = _figure(10, 12)
    ax.scatter(x.flatten().numpy(), y.flatten().numpy(), s=8)
    lo = float(torch.minimum(x.min(), y.min()))
    hi = float(torch.maximum(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    return write_bytes(path, _png_bytes(fig))
