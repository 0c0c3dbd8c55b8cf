"""The analysis tools on the default model (SmolLM2-135M-Instruct) and IOI: signs and recoveries,
never specific head indices."""

import pytest
import torch

from interplab import capture
from interplab.analysis import (ablation_sweep, compare_grids, direct_logit_attribution, embedding_arithmetic,
                                ioi_task, lens_logits, patch_residual, sweep_summary)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ioi(smollm):
    return ioi_task(8, seed=0, tokenizer=smollm.tokenizer)


def test_ioi_residual_patching(smollm, ioi):
    grid = patch_residual(smollm, ioi, kind="hook_resid_post", layers=[0, -2, -1], columns="marks")
    clean, corrupted = grid.meta["clean_metric"], grid.meta["corrupted_metric"]
    assert clean > 1.0  # the model prefers the indirect object on clean prompts
    assert corrupted < 0  # and the subject once S2 names the IO
    assert grid.col_labels == ["IO", "S1", "S2", "end"]
    last, before_last = f"L{smollm.n_layers - 1}.resid_post", f"L{smollm.n_layers - 2}.resid_post"
    # at the last position of the final layers, the residual carries everything
    assert grid.cell(last, "end") == pytest.approx(1.0, abs=1e-3)
    assert grid.cell(before_last, "end") > 0.8
    # after block 0 the difference still sits at the changed name (S2), not at IO, S1 or the end
    assert grid.cell("L0.resid_post", "S2") > 0.9
    for col in ("IO", "S1"):
        assert abs(grid.cell("L0.resid_post", col)) < 1e-4
    assert abs(grid.cell("L0.resid_post", "end")) < 0.1
    # attribution patching tracks these cells
    approx = patch_residual(smollm, ioi, kind="hook_resid_post", layers=[0, -2, -1], columns="marks",
                            method="attribution")
    assert compare_grids(grid, approx)["pearson"] > 0.7


def test_head_sweep_finds_heads_that_matter(smollm, ioi):
    grid = ablation_sweep(smollm, ioi, method="mean", layers="20-23", mlps=False, cells_per_forward=12)
    baseline = grid.meta["baseline_metric"]
    assert baseline > 1.0
    row, col, worst = grid.top(1, largest=False)[0]
    assert worst < -0.1 * baseline  # some late head's mean ablation costs > 10% of the logit difference
    lines = sweep_summary(grid, k=5)
    assert lines[0].startswith(f"{row}{col} ") and len(lines) >= 2
    assert (grid.values < 0).sum() >= 3


def test_logit_lens_last_layer_and_dla(smollm, ioi):
    last = f"blocks.{smollm.n_layers - 1}.hook_resid_post"
    cache = capture(smollm, last, list(ioi.clean[:2]), logits=True)
    torch.testing.assert_close(lens_logits(smollm, cache[last]), cache.logits, atol=1e-4, rtol=1e-4)
    dla = direct_logit_attribution(smollm, ioi)
    assert dla.total == pytest.approx(dla.readout, abs=1e-3)
    assert dla.readout > 1.0


def test_embedding_arithmetic(smollm):
    nearest = embedding_arithmetic(smollm, "king - man + woman", top_k=5)
    tokens = [t.strip().lower() for t, _ in nearest]
    assert "queen" in tokens
    assert not {" king", " man", " woman"} & {t for t, _ in nearest}
