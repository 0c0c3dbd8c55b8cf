"""Plots draw on explicit Figures: a notebook's matplotlib backend and pyplot state are untouched."""

from __future__ import annotations

import sys

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")


def test_plots_leave_the_backend_and_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    from interplab.analysis.report import Grid
    from interplab.steering.evaluate import SweepRow, plot_heatmap, plot_sweep
    from interplab.toy import plots
    from interplab.toy.artifacts import save_figure
    from interplab.toy.grokking import GrokkingHistory

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's own backend (e.g. inline)
    try:
        open_before = plt.get_fignums()
        grid = Grid(torch.tensor([[0.5, -1.0], [2.0, float("nan")]]), ["r0", "r1"], ["c0", "c1"], title="t",
                    value_name="v")
        paths = grid.save(tmp_path / "grid", "g")
        rows = [SweepRow(**_sweep_row(layer, m)) for layer in (1, 2) for m in (-1.0, 1.0)]
        plot_sweep(rows, tmp_path / "sweep.png")
        plot_heatmap(rows, tmp_path / "heat.png")
        history = GrokkingHistory(step=[0, 10], train_loss=[2.0, 1.0], test_loss=[2.0, 1.5], train_accuracy=[0.1, 1.0],
                                  test_accuracy=[0.1, 0.5], weight_norm=[3.0, 2.0])
        save_figure(plots.grokking_curves(history, 10, None), tmp_path / "curves.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == open_before  # nothing registered with pyplot
        for path in [paths["png"], tmp_path / "sweep.png", tmp_path / "heat.png", tmp_path / "curves.png"]:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)


def _sweep_row(layer: int, multiplier: float) -> dict:
    from dataclasses import fields

    from interplab.steering.evaluate import SweepRow

    values = {f.name: 0.5 for f in fields(SweepRow)}
    values.update({"layer": layer, "n_items": 2, fields(SweepRow)[1].name: multiplier})  # the strength field, whatever its name
    return values


def test_importing_interplab_does_not_import_matplotlib():
    import subprocess

    code = "import interplab, interplab.figures, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
