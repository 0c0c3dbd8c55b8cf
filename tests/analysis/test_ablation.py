import copy

import pytest
import torch

from interplab import capture, intervene, patch
from interplab.analysis import Direction, ablate, ablated_metric, ablation_sweep, sweep_summary
from interplab.models.handle import LoadedModel
from tests.analysis.tiny_tasks import tiny_task
from tests.helpers import hook_count, logits, random_ids
from tests.tiny import tiny_model


def _with_o_proj_slice_zeroed(model, layer, head):
    """A copy of the model whose output projection ignores one head's slice of its input."""
    hf = copy.deepcopy(model.hf)
    clone = LoadedModel.wrap(hf, model.tokenizer)
    proj = clone.block_module(layer, clone.arch.attn_o)
    cols = slice(head * model.d_head, (head + 1) * model.d_head)
    with torch.no_grad():
        if isinstance(proj, torch.nn.Linear):
            proj.weight[:, cols] = 0
        else:  # GPT-2 Conv1D: weight is (in, out)
            proj.weight[cols, :] = 0
    return clone


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen3"])
def test_zero_ablating_a_head_equals_zeroing_its_output_projection_slice(arch):
    model = tiny_model(arch)
    before = hook_count(model)  # HF may keep its own hooks; compare within the test
    ids = random_ids()
    expected = logits(_with_o_proj_slice_zeroed(model, 1, 2), ids)
    with ablate(model, ["L1H2"], method="zero"):
        got = logits(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, logits(model, ids), atol=1e-6)
    assert hook_count(model) == before


def test_mean_ablation_with_a_single_example_reference_equals_patching_it(llama):
    example, others = "w10 w11 w12 w13 w14 w15", ["w20 w21 w22 w23 w24 w25", "w30 w31 w32 w33 w34 w35"]
    for component, site in [("L1.mlp", "blocks.1.hook_mlp_out"), ("L0H3", "blocks.0.attn.hook_z"),
                            ("L2N7", "blocks.2.mlp.hook_post")]:
        ref = capture(llama, site, example)
        index = {"L0H3": 3, "L2N7": 7}.get(component)
        with ablate(llama, [component], method="mean", reference=[example], per_position=True):
            ablated = capture(llama, "ln_final.hook_normalized", others)["ln_final.hook_normalized"]
        with intervene(llama, {site: patch(ref, index=index)}):
            patched = capture(llama, "ln_final.hook_normalized", others)["ln_final.hook_normalized"]
        torch.testing.assert_close(ablated, patched)


def test_sweep_matches_ablating_one_part_at_a_time(llama):
    task = tiny_task(n=3, metric="prob")
    for method in ("zero", "mean", "resample"):
        grid = ablation_sweep(llama, task, method=method, layers=[0, 2], cells_per_forward=3)
        assert grid.col_labels == ["H0", "H1", "H2", "H3", "mlp"] and grid.row_labels == ["L0", "L2"]
        baseline = grid.meta["baseline_metric"]
        if method != "resample":  # resample draws rows differently in the context manager
            for row, col in [("L0", "H1"), ("L2", "H3"), ("L2", "mlp")]:
                name = f"{row}{col}" if col != "mlp" else f"{row}.mlp"
                single = ablated_metric(llama, task, [name], method=method)
                assert grid.cell(row, col) == pytest.approx(single - baseline, abs=1e-6)
    again = ablation_sweep(llama, task, method="resample", layers=[0, 2], cells_per_forward=7)
    torch.testing.assert_close(again.values, grid.values)


def test_sweep_summary_names_parts_that_lower_the_metric(llama):
    grid = ablation_sweep(llama, tiny_task(n=3), method="zero")
    lines = sweep_summary(grid, k=3)
    worst = grid.top(1, largest=False)[0]
    assert worst[2] < 0 and lines[0].startswith(f"{worst[0]}{worst[1]}" if worst[1] != "mlp" else f"{worst[0]}.mlp")


def test_several_parts_at_once_and_hooks_removed(llama):
    before = hook_count(llama)
    task = tiny_task(n=2)
    both = ablated_metric(llama, task, ["L0H1", "L0H2", "L1.attn", "L2N5"], method="zero")
    one = ablated_metric(llama, task, ["L0H1"], method="zero")
    assert both != pytest.approx(one)
    with ablate(llama, ["L0H1", "L0H2"], method="zero"):
        z = capture(llama, "blocks.0.attn.hook_z", "w4 w5 w6")["blocks.0.attn.hook_z"]
    assert torch.equal(z[..., 1:3, :], torch.zeros_like(z[..., 1:3, :])) and z[..., 0, :].abs().sum() > 0
    assert hook_count(llama) == before


def test_direction_ablation(llama):
    site = "blocks.1.hook_resid_post"
    u = torch.randn(32)
    unit = u / u.norm()
    texts = ["w4 w5 w6 w7", "w8 w9 w10 w11"]
    with ablate(llama, [Direction(site, u)], method="zero"):
        got = capture(llama, site, texts)[site]
    torch.testing.assert_close(got @ unit, torch.zeros(2, 4), atol=1e-5, rtol=0)
    reference = ["w20 w21 w22 w23", "w30 w31 w32 w33"]
    ref = capture(llama, site, reference)[site] @ unit  # (2, 4)
    with ablate(llama, [Direction(site, u)], method="mean", reference=reference):
        got = capture(llama, site, texts)[site]
    torch.testing.assert_close(got @ unit, ref.mean().expand(2, 4), atol=1e-5, rtol=0)
    with ablate(llama, [Direction(site, u)], method="mean", reference=reference, per_position=True):
        got = capture(llama, site, texts)[site]
    torch.testing.assert_close(got @ unit, ref.mean(0).expand(2, 4), atol=1e-5, rtol=0)
    base = capture(llama, site, texts)[site]
    with ablate(llama, [Direction(site, u)], method="resample", reference=reference):
        got = capture(llama, site, texts)[site]
    for row in range(2):
        assert any(torch.allclose(got[row] @ unit, ref[r], atol=1e-5) for r in range(2))
        # only the component along u changed
        torch.testing.assert_close(got[row] - (got[row] @ unit)[:, None] * unit,
                                   base[row] - (base[row] @ unit)[:, None] * unit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("components, kwargs, match", [
    (["L0H4"], {}, r"head index 4 in 'L0H4' is out of range: tiny-llama has 4 heads per layer \(valid 0..3\)"),
    (["L0N64"], {}, r"neuron index 64 .* 64 neurons"),
    (["L3H0"], {}, r"layer 3 is out of range"),
    (["L0X1"], {}, r"component 'L0X1' is not understood"),
    ([], {}, "no components"),
    (["L0H1"], {"method": "mean"}, "needs a reference"),
    (["L0H1"], {"method": "average"}, "method must be one of"),
    ([Direction("blocks.0.hook_resid_post", torch.ones(5))], {}, r"shape \(5,\)"),
])
def test_bad_input_registers_nothing(llama, components, kwargs, match):
    before = hook_count(llama)
    with pytest.raises(ValueError, match=match):
        ablate(llama, components, **kwargs)
    assert hook_count(llama) == before


def test_sweep_rejects_short_per_position_reference(llama):
    with pytest.raises(ValueError, match="at least 6 tokens"):
        ablation_sweep(llama, tiny_task(), method="mean", per_position=True, reference=["w4 w5"])
