import pytest

from interplab.sites import Site, all_site_names, parse_site


def test_parse_and_negative_layers():
    assert parse_site("blocks.2.hook_resid_post", 4) == Site(2, "hook_resid_post")
    assert parse_site("blocks.-1.attn.hook_z", 4) == Site(3, "attn.hook_z")
    assert parse_site("hook_embed", 4) == Site(None, "hook_embed")
    assert parse_site("blocks.-4.mlp.hook_post", 4).name == "blocks.0.mlp.hook_post"


def test_layer_out_of_range_message():
    with pytest.raises(ValueError, match=r"layer 30 is out of range.*4 blocks \(valid 0..3 or -4..-1\)"):
        parse_site("blocks.30.hook_resid_post", 4)


def test_misspelled_site_lists_close_matches():
    with pytest.raises(ValueError, match=r"Did you mean 'blocks.1.hook_resid_post'"):
        parse_site("blocks.1.hook_resid_pots", 4)
    with pytest.raises(ValueError, match="unknown site"):
        parse_site("resid", 4)


def test_resid_mid_absent_in_parallel_blocks():
    with pytest.raises(ValueError, match="in parallel"):
        parse_site("blocks.0.hook_resid_mid", 2, parallel=True)
    assert "blocks.0.hook_resid_mid" not in all_site_names(2, parallel=True)
    assert "blocks.0.hook_resid_mid" in all_site_names(2)


def test_site_order_follows_forward_pass():
    names = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed",
             "ln_final.hook_normalized", "blocks.0.mlp.hook_post"]
    ordered = sorted((parse_site(n, 2) for n in names), key=lambda s: s.depth(2))
    assert [s.name for s in ordered] == ["hook_embed", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post",
                                         "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre",
                                         "ln_final.hook_normalized"]


def test_every_layer_check_gives_the_same_message():
    """Sites, steering vectors, extraction and analysis resolve layers through one function."""
    import torch

    import interplab
    from interplab.analysis.components import parse_layers
    from interplab.steering.extract import check_layers
    from interplab.steering.vector import SteeringVector
    from tests.tiny import tiny_model

    model = tiny_model("llama")
    expected = "layer 30 is out of range: LlamaForCausalLM has 3 blocks (valid 0..2 or -3..-1)"
    vector = SteeringVector({0: torch.ones(32)}, site="hook_resid_post")
    attempts = [
        lambda: model.site("blocks.30.hook_resid_post"),
        lambda: interplab.capture(model, "blocks.30.hook_resid_post", "the cat"),
        lambda: vector.apply(model, layers=[30]),
        lambda: check_layers(model, [30]),
        lambda: parse_layers(model, [30]),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError) as caught:
            attempt()
        assert str(caught.value) == expected
