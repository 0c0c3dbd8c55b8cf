import json

import pytest
import torch

from interplab import intervene, patch
from interplab.analysis import compare_grids, patch_components, patch_heads, patch_layers, patch_residual, patch_sites
from interplab.analysis.cells import final_logits
from interplab.analysis.patching import prepare
from interplab.analysis.tasks import Task
from interplab.cache import capture
from tests.analysis.tiny_tasks import tiny_task
from tests.helpers import hook_count
from tests.tiny import tiny_model


def _every_component(model):
    heads = [f"L{layer}H{h}" for layer in range(model.n_layers) for h in range(model.n_heads)]
    return ["embed"] + heads + [f"L{layer}.mlp" for layer in range(model.n_layers)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_patching_every_site_from_the_clean_run_recovers_the_clean_metric(arch):
    model = tiny_model(arch)
    before = hook_count(model)  # HF may keep its own hooks; compare within the test
    task = tiny_task()
    result = patch_components(model, task, _every_component(model))
    assert result.metric == pytest.approx(result.clean_metric, abs=1e-5)
    assert result.recovery == pytest.approx(1.0, abs=1e-3)
    assert abs(result.clean_metric - result.corrupted_metric) > 1e-4
    # and the other way round: noising everything gives the corrupted metric
    noised = patch_components(model, task, _every_component(model), direction="noise")
    assert noised.metric == pytest.approx(noised.corrupted_metric, abs=1e-5)
    assert hook_count(model) == before


def test_residual_grid_is_exact_at_layer_0_and_position_dependent(llama):
    task = tiny_task(changed=3)
    grid = patch_residual(llama, task, layers=[0], columns=None)
    # resid_pre of block 0 differs only at the changed word: patching it there recovers all, elsewhere nothing
    assert grid.values[0, 3] == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(grid.values[0, [0, 1, 2, 4, 5]], torch.zeros(5), atol=1e-6)
    # every prompt has other words at each position; only the mark X sits at 3 in all of them
    assert grid.col_labels == ["0 (varies)", "1 (varies)", "2 (varies)", "3 X", "4 (varies)", "5 (varies)"]
    marks = patch_residual(llama, task, layers=[0, 2], columns="marks", kind="hook_resid_post")
    assert marks.col_labels == ["X", "end"]
    assert marks.cell("L2.resid_post", "end") == pytest.approx(1.0, abs=1e-5)  # the last block's output at the end


def _naive_grid(model, task, sites, n_positions):
    """One forward pass per cell with the foundation's patch(): the reference the batched engine must match."""
    enc = task.encode(model)
    clean = capture(model, sites, {"input_ids": enc.clean_ids, "attention_mask": enc.clean_mask})
    out = torch.zeros(len(sites), n_positions)
    for i, site in enumerate(sites):
        for p in range(n_positions):
            with intervene(model, {site: patch(clean, positions=p)}):
                logits = final_logits(model, enc.corrupted_ids, enc.corrupted_mask, enc.last("corrupted"))
            out[i, p] = enc.score(logits).mean()
    return out


@pytest.mark.parametrize("cells_per_forward", [1, 5, 64])
def test_batched_grid_equals_one_forward_per_cell(llama, cells_per_forward):
    task = tiny_task(n=3)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.2.hook_resid_post"]
    grid = patch_sites(llama, task, sites, columns=None, cells_per_forward=cells_per_forward)
    torch.testing.assert_close(grid.raw, _naive_grid(llama, task, sites, 6), atol=1e-5, rtol=1e-5)


def test_head_and_layer_grids_match_single_component_patching(llama):
    task = tiny_task(n=3)
    heads = patch_heads(llama, task, cells_per_forward=5)
    assert heads.values.shape == (3, 4)
    assert heads.cell("L1", "H2") == pytest.approx(patch_components(llama, task, ["L1H2"]).recovery, abs=1e-5)
    layers = patch_layers(llama, task, position="X")
    assert layers.row_labels == ["attn_out", "mlp_out"]
    assert layers.cell("mlp_out", "L2") == pytest.approx(
        patch_components(llama, task, ["L2.mlp"], position="X").recovery, abs=1e-5)


def test_attribution_equals_patching_where_the_metric_is_linear(any_model):
    # the logit difference is linear in the final norm's output, so the first-order estimate is exact
    if getattr(any_model.config, "final_logit_softcapping", None):
        pytest.skip("soft-capped logits are not linear in the final norm's output")
    task = tiny_task(n=3)
    exact = patch_sites(any_model, task, ["ln_final.hook_normalized"], columns=None)
    approx = patch_sites(any_model, task, ["ln_final.hook_normalized"], columns=None, method="attribution")
    torch.testing.assert_close(approx.raw, exact.raw, atol=1e-5, rtol=1e-4)
    assert compare_grids(exact, approx)["pearson"] == pytest.approx(1.0, abs=1e-4)


def test_attribution_is_zero_where_runs_agree_and_leaves_param_grads_alone(llama):
    task = tiny_task(changed=3)
    approx = patch_residual(llama, task, layers=[0, 1], columns=None, method="attribution")
    assert torch.equal(approx.values[:, :3], torch.zeros(2, 3))  # positions before the change are identical
    assert approx.values[0, 3] != 0
    assert all(p.grad is None for p in llama.hf.parameters())
    heads = patch_heads(llama, task, method="attribution")
    assert heads.values.shape == (3, 4) and torch.isfinite(heads.values).all()


def test_grid_save_writes_csv_json_png(llama, tmp_path):
    grid = patch_residual(llama, tiny_task(), layers="0-1", columns="marks")
    paths = grid.save(tmp_path, "resid")
    data = json.loads(paths["json"].read_text())
    assert data["format_version"] == 1 and data["rows"] == ["L0.resid_pre", "L1.resid_pre"]
    assert data["meta"]["clean_metric"] == pytest.approx(grid.meta["clean_metric"])
    assert paths["csv"].read_text().splitlines()[0] == ",X,end"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_corrupted_prompt_of_another_length_is_explained(llama):
    task = Task(clean=["w4 w5 w6 w7"], correct=["w5"], incorrect=["w6"], corrupted=["w4 w9 w5 w6 w7"])
    with pytest.raises(ValueError, match=r"(?s)clean prompt 0 is 4 tokens but its corrupted counterpart is 5.*position_map"):
        patch_residual(llama, task)


def test_position_map_aligns_clean_activations(llama):
    # corrupted has an extra token at position 1; position_map gives each corrupted token's clean position
    task = Task(clean=["w4 w5 w6 w7"], correct=["w5"], incorrect=["w6"], corrupted=["w4 w9 w5 w6 w7"],
                position_map=[[0, -1, 1, 2, 3]], marks={"w6": [6]})
    site = llama.site("blocks.0.hook_resid_pre")
    setup = prepare(llama, task, [site])
    clean = capture(llama, site.name, "w4 w5 w6 w7")[site.name]
    torch.testing.assert_close(setup.sources[site][0, [0, 2, 3, 4]], clean[0])
    assert setup.valid[0].tolist() == [True, False, True, True, True]
    assert int(setup.enc.corrupted_marks["w6"][0]) == 3 and int(setup.enc.clean_marks["w6"][0]) == 2
    grid = patch_residual(llama, task, layers=[0], columns=None)
    assert abs(float(grid.values[0, 1])) < 1e-4  # the inserted token has no counterpart and is never patched


@pytest.mark.parametrize("call, match", [
    (lambda m, t: patch_components(m, t, ["L0H4"]), r"head index 4 in 'L0H4' is out of range.*4 heads"),
    (lambda m, t: patch_components(m, t, ["L7H0"]), r"layer 7 is out of range"),
    (lambda m, t: patch_residual(m, t, layers=[5]), r"layer 5 is out of range"),
    (lambda m, t: patch_residual(m, t, columns=["IO"]), r"no mark named 'IO'"),
    (lambda m, t: patch_residual(m, t, columns=[9]), r"position 9 is out of range"),
    (lambda m, t: patch_residual(m, t, direction="sideways"), "denoise"),
    (lambda m, t: patch_heads(m, t, method="guess"), "attribution"),
    (lambda m, t: patch_residual(m, Task(["w4 w5"], ["w5"], ["w6"])), "no corrupted prompts"),
    (lambda m, t: patch_residual(m, Task(["w4 w5"], ["w5"], ["w6"], corrupted=["w4 w5"])), "score the same"),
])
def test_bad_input(llama, call, match):
    before = hook_count(llama)
    with pytest.raises(ValueError, match=match):
        call(llama, tiny_task())
    assert hook_count(llama) == before


def test_prefix_reuse_equals_running_every_token(any_model):
    from interplab.analysis.cells import Target, run_cells

    task = tiny_task(n=2, length=11)  # longer than the tiny Gemma models' sliding window (8)
    sites = [any_model.site("blocks.0.hook_resid_pre"), any_model.site("blocks.1.attn.hook_z"),
             any_model.site("blocks.2.hook_mlp_out")]
    setup = prepare(any_model, task, sites)
    ids, mask, last = setup.ids
    cells = [[Target(site, None, torch.full((2,), p))] for site in sites for p in range(11)]
    cells.append([Target(sites[1], 2, torch.tensor([4, 5])), Target(sites[2], None, torch.tensor([6, 3]))])
    fast = run_cells(any_model, ids, mask, last, setup.sources, cells, setup.enc.score, cells_per_forward=4)
    slow = run_cells(any_model, ids, mask, last, setup.sources, cells, setup.enc.score, cells_per_forward=4,
                     reuse_prefix=False)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)


def test_position_columns_say_what_they_hold_in_every_prompt(llama):
    same = Task(clean=["the cat sat on the mat", "the dog sat on the mat ."],
                corrupted=["the cat sat on a mat", "the dog sat on a mat ."],
                correct=["w5", "w6"], incorrect=["w7", "w8"], name="labels")
    grid = patch_residual(llama, same, layers=[0], columns=None)
    # labels name the patched (corrupted) run: token 1 differs (cat/dog), the rest agree; the 7th
    # position exists in one prompt of two
    assert grid.col_labels == ["0 the", "1 (varies)", "2 sat", "3 on", "4 a", "5 mat", "6 . [1/2]"]
    swapped = Task(clean=["w4 w5 w6 w7", "w5 w4 w6 w7"], corrupted=["w4 w5 w9 w7", "w5 w4 w9 w7"],
                   correct=["w10", "w11"], incorrect=["w12", "w13"], marks={"A": [0, 3], "B": [3, 0]},
                   name="marks")
    grid = patch_residual(llama, swapped, layers=[0], columns=None)
    assert grid.col_labels == ["0 A/B", "1 A/B", "2 w9", "3 w7"]  # marks are character offsets
