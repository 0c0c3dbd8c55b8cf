import pytest
import torch

import interplab
from interplab.models.arch import get_submodule
from tests.helpers import BASELINE_HOOKS, hook_count, random_ids
from tests.tiny import tiny_model


def test_resid_post_equals_hf_hidden_states(any_model):
    ids = random_ids()
    with torch.no_grad():
        hidden = any_model.hf(input_ids=ids, output_hidden_states=True).hidden_states
    sites = [f"blocks.{i}.hook_resid_post" for i in range(any_model.n_layers)]
    cache = interplab.capture(any_model, sites, ids)
    # HF normalises the last block's output before returning it; every other block must match.
    for i in range(any_model.n_layers - 1):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1], atol=1e-5, rtol=0)
    pre = interplab.capture(any_model, "blocks.0.hook_resid_pre", ids)["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(pre, hidden[0], atol=1e-5, rtol=0)
    assert hook_count(any_model) == BASELINE_HOOKS[any_model.arch.model_type]


def test_residual_stream_decomposes(any_model):
    ids = random_ids()
    kinds = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
    if not any_model.arch.parallel:
        kinds.append("hook_resid_mid")
    cache = interplab.capture(any_model, [f"blocks.1.{k}" for k in kinds], ids)
    pre, attn, mlp, post = (cache[f"blocks.1.{k}"] for k in kinds[:4])
    torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=1e-5)
    if not any_model.arch.parallel:
        torch.testing.assert_close(cache["blocks.1.hook_resid_mid"], pre + attn, atol=1e-6, rtol=0)


def test_hook_z_recombines_to_attn_out(any_model):
    ids = random_ids()
    cache = interplab.capture(any_model, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"], ids)
    z = cache["blocks.1.attn.hook_z"]
    assert z.shape == (2, 7, any_model.n_heads, any_model.d_head)
    arch, block = any_model.arch, any_model.block(1)
    with torch.no_grad():
        out = get_submodule(block, arch.attn_o)(z.flatten(-2))  # (b, p, H, dh) -> (b, p, H*dh)
        if arch.attn_out != arch.attn:  # Gemma 2/3, OLMo 2: a norm sits after the projection
            out = get_submodule(block, arch.attn_out)(out)
    torch.testing.assert_close(out, cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-5)


def test_pattern_is_a_distribution_and_sdpa_is_restored():
    model = tiny_model("llama", attn_implementation="sdpa")
    cache = interplab.capture(model, "blocks.0.attn.hook_pattern", random_ids())
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (2, 4, 7, 7)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 7))
    assert torch.all(pattern.triu(1) == 0)  # causal
    assert model.hf.config._attn_implementation == "sdpa"


def test_left_and_right_padding_give_same_activations(llama):
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    right = interplab.capture(llama, "blocks.2.hook_resid_post", rows, padding_side="right")
    left = interplab.capture(llama, "blocks.2.hook_resid_post", rows, padding_side="left")
    torch.testing.assert_close(right["blocks.2.hook_resid_post"][1, :3], left["blocks.2.hook_resid_post"][1, 2:],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right.by_position("blocks.2.hook_resid_post")[1, :3],
                               left.by_position("blocks.2.hook_resid_post")[1, :3], atol=1e-5, rtol=1e-5)


def test_batching_matches_single_pass(llama):
    ids = random_ids(5, 6)
    one = interplab.capture(llama, "blocks.1.mlp.hook_post", ids, batch_size=5)
    many = interplab.capture(llama, "blocks.1.mlp.hook_post", ids, batch_size=2)
    torch.testing.assert_close(one["blocks.1.mlp.hook_post"], many["blocks.1.mlp.hook_post"])


def test_only_requested_sites_kept_with_dtype_and_negative_names(llama):
    cache = interplab.capture(llama, ["blocks.-1.hook_resid_post"], random_ids(), dtype=torch.float16)
    assert list(cache) == ["blocks.2.hook_resid_post"]
    assert cache["blocks.-1.hook_resid_post"].dtype == torch.float16
    with pytest.raises(KeyError, match="was not captured"):
        cache["blocks.0.hook_resid_post"]


def test_stops_after_deepest_site(llama):
    calls = []
    handle = llama.block(2).register_forward_hook(lambda *a: calls.append(1))
    try:
        interplab.capture(llama, "blocks.0.hook_resid_post", random_ids())
        assert calls == []
        cache = interplab.capture(llama, "blocks.0.hook_resid_post", random_ids(), logits=True)
        assert calls == [1] and cache.logits.shape == (2, 7, llama.vocab_size)
    finally:
        handle.remove()


def test_texts_are_tokenised(llama):
    cache = interplab.capture(llama, "hook_embed", ["the cat sat", "the dog"])
    assert cache["hook_embed"].shape == (2, 3, 32)
    assert cache.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("bad, match", [
    ([], "no inputs"),
    ([""], "empty"),
    (torch.tensor([[5, 500]]), "vocabulary"),
    (torch.randint(3, 50, (1, 100)), "at most 64 positions"),
])
def test_bad_inputs_fail_before_any_hook(llama, bad, match):
    with pytest.raises(ValueError, match=match):
        interplab.capture(llama, "blocks.0.hook_resid_post", bad)
    assert hook_count(llama) == BASELINE_HOOKS["llama"]


def test_bad_sites(llama):
    with pytest.raises(ValueError, match="out of range"):
        interplab.capture(llama, "blocks.3.hook_resid_post", random_ids())
    with pytest.raises(ValueError, match="Did you mean"):
        interplab.capture(llama, "blocks.0.hook_resid_psot", random_ids())
    with pytest.raises(ValueError, match="no sites"):
        interplab.capture(llama, [], random_ids())
    assert hook_count(llama) == BASELINE_HOOKS["llama"]
