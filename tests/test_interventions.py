import pytest
import torch

import interplab
from interplab import intervene
from interplab.interventions import (add_vector, clamp_direction, mean_ablate, patch, project_out,
                                     resample_ablate, zero_ablate)
from tests.helpers import BASELINE_HOOKS, hook_count, logits, random_ids

SITE = "blocks.1.hook_resid_post"


def test_identity_intervention_is_bit_identical(any_model):
    ids = random_ids()
    base = logits(any_model, ids)
    sites = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post",
             "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", SITE, "ln_final.hook_normalized"]
    if not any_model.arch.parallel:
        sites.append("blocks.2.hook_resid_mid")
    with intervene(any_model, {s: (lambda act: act) for s in sites}):
        steered = logits(any_model, ids)
    assert torch.equal(base, steered)
    assert hook_count(any_model) == BASELINE_HOOKS[any_model.arch.model_type]


def test_zero_vector_and_v_minus_v_reproduce_baseline(any_model):
    ids = random_ids()
    base = logits(any_model, ids)
    v = torch.randn(any_model.d_model)
    with intervene(any_model, {SITE: add_vector(0 * v)}):
        assert torch.equal(logits(any_model, ids), base)
    with intervene(any_model, {SITE: [add_vector(v), add_vector(-v)]}):
        torch.testing.assert_close(logits(any_model, ids), base, atol=1e-5, rtol=1e-5)
    with intervene(any_model, {SITE: add_vector(v, scale=3.0)}):
        assert (logits(any_model, ids) - base).abs().max() > 1e-3


def test_add_vector_changes_exactly_the_selected_positions(llama):
    ids = random_ids(2, 6)
    v = torch.randn(32)
    cache = interplab.capture(llama, SITE, ids)
    with intervene(llama, {SITE: add_vector(v, scale=2.0, positions=slice(1, 3))}):
        steered = interplab.capture(llama, SITE, ids)
    delta = steered[SITE] - cache[SITE]
    torch.testing.assert_close(delta[:, 1:3], (2.0 * v).expand(2, 2, 32))
    assert torch.equal(delta[:, [0, 3, 4, 5]], torch.zeros(2, 4, 32))


def test_resid_mid_write_changes_the_residual_not_just_the_mlp_input(llama):
    ids = random_ids()
    v = torch.randn(32)
    base = interplab.capture(llama, ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"], ids)
    with intervene(llama, {"blocks.1.hook_resid_mid": add_vector(v)}):
        new = interplab.capture(llama, ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"], ids)
    torch.testing.assert_close(new["blocks.1.hook_resid_mid"], base["blocks.1.hook_resid_mid"] + v, atol=1e-5, rtol=0)
    torch.testing.assert_close(new["blocks.1.hook_resid_post"],
                               new["blocks.1.hook_resid_mid"] + new["blocks.1.hook_mlp_out"], atol=1e-5, rtol=0)


def test_norm_preserving_keeps_norm(llama):
    ids = random_ids()
    base = interplab.capture(llama, SITE, ids)[SITE]
    with intervene(llama, {SITE: add_vector(torch.randn(32), scale=5.0, norm_preserving=True)}):
        new = interplab.capture(llama, SITE, ids)[SITE]
    torch.testing.assert_close(new.norm(dim=-1), base.norm(dim=-1))
    assert (new - base).abs().max() > 1e-2


def test_project_out_and_clamp(llama):
    ids = random_ids()
    u = torch.randn(32)
    with intervene(llama, {SITE: project_out(u)}):
        removed = interplab.capture(llama, SITE, ids)[SITE]
    torch.testing.assert_close(removed @ (u / u.norm()), torch.zeros(2, 7), atol=1e-5, rtol=0)
    with intervene(llama, {SITE: clamp_direction(u, 3.0)}):
        clamped = interplab.capture(llama, SITE, ids)[SITE]
    torch.testing.assert_close(clamped @ (u / u.norm()), torch.full((2, 7), 3.0), atol=1e-5, rtol=0)


def test_zero_ablating_a_head_equals_zeroing_its_o_proj_slice(llama):
    ids = random_ids()
    head, d_head = 2, llama.d_head
    o_proj = llama.block(1).self_attn.o_proj

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_slice)
    try:
        expected = logits(llama, ids)
    finally:
        handle.remove()
    with intervene(llama, {"blocks.1.attn.hook_z": zero_ablate(index=head)}):
        torch.testing.assert_close(logits(llama, ids), expected, atol=1e-6, rtol=0)


def test_mean_ablation_with_one_reference_equals_patching_it(llama):
    clean, other = random_ids(1, 7, seed=1), random_ids(2, 7, seed=2)
    ref = interplab.capture(llama, "blocks.0.mlp.hook_post", clean)
    with intervene(llama, {"blocks.0.mlp.hook_post": mean_ablate(ref, per_position=True)}):
        mean_ablated = logits(llama, other)
    with intervene(llama, {"blocks.0.mlp.hook_post": patch(ref)}):
        patched = logits(llama, other)
    torch.testing.assert_close(mean_ablated, patched)
    # and patching everything from the clean run reproduces the clean run
    with intervene(llama, {"blocks.0.mlp.hook_post": patch(ref)}):
        torch.testing.assert_close(logits(llama, clean), logits(llama, clean))


def test_mean_over_positions_and_resample(llama):
    ref = interplab.capture(llama, SITE, random_ids(4, 7, seed=3))
    ids = random_ids()
    with intervene(llama, {SITE: mean_ablate(ref)}):
        got = interplab.capture(llama, SITE, ids)[SITE]
    torch.testing.assert_close(got, ref[SITE].mean((0, 1)).expand(2, 7, 32), atol=1e-5, rtol=0)
    with intervene(llama, {SITE: resample_ablate(ref, seed=0)}):
        got = interplab.capture(llama, SITE, ids)[SITE]
    for row in range(2):
        assert any(torch.allclose(got[row], ref[SITE][r]) for r in range(4))


def test_patch_from_cache_respects_left_padding(llama):
    rows = [[5, 6, 7, 8], [9, 10]]
    src = interplab.capture(llama, "blocks.0.hook_resid_post", rows, padding_side="left")
    with intervene(llama, {"blocks.0.hook_resid_post": patch(src)}):
        got = interplab.capture(llama, "blocks.0.hook_resid_post", rows, padding_side="right")
    torch.testing.assert_close(got.by_position("blocks.0.hook_resid_post")[1, :2],
                               src.by_position("blocks.0.hook_resid_post")[1, :2])


def test_exception_inside_with_leaves_no_hooks(llama):
    before = hook_count(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(llama, {SITE: add_vector(torch.ones(32)), "blocks.0.attn.hook_z": zero_ablate()}):
            assert hook_count(llama) > before
            raise RuntimeError("boom")
    assert hook_count(llama) == before


def test_handle_form(llama):
    ids = random_ids()
    base = logits(llama, ids)
    handle = intervene(llama, {SITE: add_vector(torch.ones(32))})
    assert handle.active and not torch.equal(logits(llama, ids), base)
    handle.remove()
    assert not handle.active and torch.equal(logits(llama, ids), base)


@pytest.mark.parametrize("mapping, match", [
    ({"blocks.9.hook_resid_post": add_vector(torch.ones(32))}, r"layer 9 is out of range.*3 blocks"),
    ({SITE: add_vector(torch.ones(4096))}, r"shape \(4096,\).*\(32,\)"),
    ({"blocks.0.hook_resid_psot": add_vector(torch.ones(32))}, "Did you mean"),
    ({"blocks.0.attn.hook_z": zero_ablate(index=7)}, r"index 7 is out of range.*4 heads"),
    ({"blocks.0.attn.hook_pattern": zero_ablate()}, "read but not changed"),
    ({"blocks.0.attn.hook_pattern": lambda act: act}, "read but not changed"),
    ({}, "non-empty"),
])
def test_bad_input_registers_nothing(llama, mapping, match):
    before = hook_count(llama)
    with pytest.raises(ValueError, match=match):
        intervene(llama, mapping)
    assert hook_count(llama) == before


@pytest.mark.parametrize("build, match", [
    (lambda: add_vector(torch.tensor([float("nan")] * 32)), "NaN or inf"),
    (lambda: add_vector(torch.ones(32), scale=float("inf")), "finite real number"),
    (lambda: add_vector(torch.ones(32), scale=True), "finite real number"),
    (lambda: add_vector(torch.ones(32, dtype=torch.complex64)), "complex-valued"),
    (lambda: project_out(torch.ones(32, dtype=torch.complex64)), "complex-valued"),
    (lambda: clamp_direction(torch.ones(32), float("nan")), "finite real number"),
    (lambda: zero_ablate(positions="bogus"), r"'bogus'.*'all', 'prompt', 'generated'"),
    pytest.param(lambda: zero_ablate(index="0"), "index must be an int", marks=pytest.mark.wrong_types),
    pytest.param(lambda: add_vector(torch.ones(32), norm_preserving="yes"), "norm_preserving must be True or False",
                 marks=pytest.mark.wrong_types),
    pytest.param(lambda: mean_ablate(torch.ones(2, 3, 32), per_position=1), "per_position must be True or False",
                 marks=pytest.mark.wrong_types),
    (lambda: zero_ablate(index=[True]), "index must hold ints"),
    pytest.param(lambda: mean_ablate(torch.ones(2, 3, 32), positions=[1.5]), "not understood",
                 marks=pytest.mark.wrong_types),
    (lambda: resample_ablate("cache"), "ActivationCache or a tensor"),
    (lambda: patch(torch.ones(32)), r"\(batch, seq, \.\.\.\)"),
    (lambda: patch(torch.ones(1, 4, 32), positions=slice(0, 4, 2)), "step"),
    (lambda: interplab.Positions("bogus"), r"unknown positions mode 'bogus'.*all, prompt, generated, range, at"),
])
def test_bad_values_fail_when_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_interventions_are_immutable_values_that_bind_without_changing(llama):
    v = [0.5] * 32
    spec = add_vector(v, scale=2.0, positions=-1)
    with pytest.raises(AttributeError):
        spec.scale = 3.0
    site = llama.site(SITE)
    before = repr(spec)
    spec.bind(site, llama)
    assert repr(spec) == before and spec.positions == interplab.Positions.at(-1)
    # one value attached twice behaves the same both times
    ids = random_ids()
    with intervene(llama, {SITE: spec}):
        first = logits(llama, ids)
    with intervene(llama, {SITE: spec}):
        torch.testing.assert_close(logits(llama, ids), first, rtol=0, atol=0)


def test_resample_draws_restart_per_attach(llama):
    ref = interplab.capture(llama, SITE, random_ids(4, 7, seed=3))
    spec, ids = resample_ablate(ref, seed=5), random_ids(3, 7)
    runs = []
    for _ in range(2):
        with intervene(llama, {SITE: spec}):
            runs.append(interplab.capture(llama, SITE, ids)[SITE])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_default_parameters_do_not_receive_the_context(llama):
    seen = []

    def scaled(act, scale=2.0):
        seen.append(scale)
        return act * scale

    ids = random_ids()
    with intervene(llama, {SITE: scaled}):
        logits(llama, ids)
    assert seen == [2.0]

    def with_ctx(act, ctx):
        seen.append(ctx.site.name)
        return act

    with intervene(llama, {SITE: with_ctx}):
        logits(llama, ids)
    assert seen[-1] == SITE


def test_site_the_architecture_lacks():
    from tests.tiny import tiny_model

    neox = tiny_model("gpt_neox")
    with pytest.raises(ValueError, match="parallel"):
        intervene(neox, {"blocks.0.hook_resid_mid": add_vector(torch.ones(32))})


def test_on_tokens_edits_only_the_selected_tokens_of_each_row(llama):
    from interplab.interventions import on_tokens

    rows = [[5, 6, 7, 8], [9, 10]]
    tokens = torch.tensor([[True, False, True, False], [False, True, False, False]])  # by absolute position
    base = interplab.capture(llama, SITE, rows, padding_side="left")
    with intervene(llama, {SITE: on_tokens(zero_ablate(), tokens)}):
        new = interplab.capture(llama, SITE, rows, padding_side="left")
    got, before = new.by_position(SITE), base.by_position(SITE)
    zeroed = (got.abs().amax(-1) == 0) & new.position_mask
    assert zeroed.tolist() == [[True, False, True, False], [False, True, False, False]]
    untouched = ~tokens & new.position_mask
    torch.testing.assert_close(got[untouched], before[untouched])
    with pytest.raises(ValueError, match="bool tensor"):
        on_tokens(zero_ablate(), tokens.long())
