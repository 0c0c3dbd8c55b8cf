"""SAE folders: interplab's own, SAELens (checked against sae-lens itself), sparsify; and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from interplab.sae import (
    SAE, SAEConfig, SAEFormatError, detect_layout, load_sae, save_sae, save_saelens,
    saelens_hook_to_site, sparsify_hookpoint_to_site,
)

FAMILIES = ["relu", "topk", "batchtopk", "jumprelu"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_looking_sae(family: str, *, input_scale: float = 1.7, seed: int = 0, **overrides) -> SAE:
    """An SAE with every parameter and buffer moved off its initial value."""
    k = {"k": 4} if family in ("topk", "batchtopk") else {}
    fields = dict(d_in=16, d_sae=64, family=family, site="blocks.3.hook_resid_post", model_id="tiny/model", **k)
    sae = SAE(SAEConfig(**{**fields, **overrides}), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in sae.named_parameters():
            tensor.add_(torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * 0.3)
        if family in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.5)
        sae.input_scale.fill_(input_scale)
    return sae


def assert_same_outputs(ours: SAE, theirs, x: torch.Tensor, *, exact: bool) -> None:
    ours_acts, their_acts = ours.encode(x), theirs.encode(x)
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_acts, their_acts, **tolerance)
    torch.testing.assert_close(ours.decode(ours_acts), theirs.decode(their_acts), **tolerance)


# ---- interplab's own format -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_own_format_round_trip(tmp_path, family):
    sae = trained_looking_sae(family)
    folder = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "sae.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 1 and config["config"]["family"] == family
    assert detect_layout(folder) == "interplab"
    loaded = load_sae(folder)
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(9, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_own_format_keeps_dtype_and_site_override(tmp_path):
    sae = trained_looking_sae("topk", dtype="float64")
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path, site="blocks.5.hook_mlp_out")
    assert loaded.W_enc.dtype == torch.float64
    assert loaded.cfg.site == "blocks.5.hook_mlp_out"


# ---- SAELens, against sae-lens itself ----------------------------------------------------------


SAELENS_CASES = [("standard", "relu"), ("topk", "topk"), ("jumprelu", "jumprelu")]


def saelens_sae(architecture: str, *, apply_b_dec_to_input: bool, seed: int = 0, **extra):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 5}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    }
    cls, cfg_cls, kwargs = classes[architecture]
    metadata = SAEMetadata(hook_name="blocks.2.hook_resid_pre", model_name="gpt2")
    cfg = cfg_cls(d_in=16, d_sae=64, apply_b_dec_to_input=apply_b_dec_to_input, metadata=metadata, **{**kwargs, **extra})
    sae = cls(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        if architecture == "jumprelu":
            sae.threshold.uniform_(0.0, 1.0)
    return sae


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("architecture, family", SAELENS_CASES)
def test_saes_saved_by_saelens_load_here_with_identical_outputs(tmp_path, architecture, family, apply_b_dec_to_input):
    theirs = saelens_sae(architecture, apply_b_dec_to_input=apply_b_dec_to_input)
    theirs.save_model(tmp_path)
    assert detect_layout(tmp_path) == "saelens"
    ours = load_sae(tmp_path)
    assert ours.cfg.family == family
    assert ours.cfg.site == "blocks.2.hook_resid_pre" and ours.cfg.model_id == "gpt2"
    assert ours.cfg.subtract_decoder_bias == apply_b_dec_to_input
    assert_same_outputs(ours, theirs, torch.randn(32, 16) * 2, exact=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("input_scale", [1.0, 1.7])
def test_saes_saved_here_load_in_saelens(tmp_path, family, input_scale):
    sae_lens = pytest.importorskip("sae_lens")
    ours = trained_looking_sae(family, input_scale=input_scale)
    save_saelens(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    expected_class = {"relu": "StandardSAE", "topk": "TopKSAE"}.get(family, "JumpReLUSAE")
    assert type(theirs).__name__ == expected_class
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    ours.eval()  # BatchTopK encodes with its threshold, which is what SAELens' JumpReLU uses
    assert_same_outputs(ours, theirs, torch.randn(32, 16) * 3, exact=input_scale == 1.0)
    back = load_sae(tmp_path)  # and it comes back here with the same outputs
    assert_same_outputs(back, ours, torch.randn(8, 16), exact=input_scale == 1.0)


def test_saelens_topk_with_decoder_norm_rescaling_is_folded(tmp_path):
    theirs = saelens_sae("topk", apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True)
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(64))
    assert_same_outputs(ours, theirs, torch.randn(32, 16), exact=False)


def test_pre_6_saelens_config_loads(tmp_path):
    weights = {"W_enc": torch.randn(8, 32), "b_enc": torch.randn(32), "W_dec": torch.randn(32, 8), "b_dec": torch.randn(8)}
    save_file(weights, tmp_path / "sae_weights.safetensors")
    old = {"d_in": 8, "d_sae": 32, "dtype": "torch.float32", "hook_point": "blocks.1.hook_mlp_out",
           "activation_fn_str": "relu", "model_name": "gelu-1l", "normalize_activations": False}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(tmp_path)
    assert (sae.cfg.family, sae.cfg.site, sae.cfg.model_id) == ("relu", "blocks.1.hook_mlp_out", "gelu-1l")
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.encode(x), ((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]).relu())


def test_saelens_hook_names():
    for name in ("blocks.0.hook_resid_pre", "blocks.11.hook_resid_post", "blocks.3.hook_mlp_out",
                 "blocks.3.hook_attn_out", "blocks.3.attn.hook_z", "blocks.3.mlp.hook_post"):
        assert saelens_hook_to_site(name) == name
    with pytest.raises(ValueError, match="not a site interplab supports"):
        saelens_hook_to_site("blocks.3.attn.hook_q")


# ---- sparsify ------------------------------------------------------------------------------------


def write_sparsify_folder(folder: Path, *, d_in: int = 16, num_latents: int = 64, k: int = 6, **cfg_extra) -> dict:
    """The layout sparsify's SparseCoder.save_to_disk writes (module state dict + cfg.json with d_in)."""
    g = torch.Generator().manual_seed(0)
    weights = {
        "encoder.weight": torch.randn(num_latents, d_in, generator=g),
        "encoder.bias": torch.randn(num_latents, generator=g),
        "W_dec": torch.randn(num_latents, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }
    folder.mkdir(parents=True)
    save_file(weights, folder / "sae.safetensors")
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": num_latents,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return weights


def test_sparsify_folder_loads_with_sparsify_math(tmp_path):
    weights = write_sparsify_folder(tmp_path / "run" / "layers.4.mlp")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    sae = load_sae(tmp_path / "run" / "layers.4.mlp")
    assert detect_layout(tmp_path / "run" / "layers.4.mlp") == "sparsify"
    assert (sae.cfg.site, sae.cfg.model_id, sae.cfg.k) == ("blocks.4.hook_mlp_out", "EleutherAI/pythia-70m", 6)
    x = torch.randn(20, 16)
    # sparsify: top-k of ReLU(linear(x − b_dec)), decoded by embedding_bag over W_dec, plus b_dec
    pre = torch.relu((x - weights["b_dec"]) @ weights["encoder.weight"].T + weights["encoder.bias"])
    top = pre.topk(6, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(sae.encode(x), expected)
    recon = torch.nn.functional.embedding_bag(top.indices, weights["W_dec"], per_sample_weights=top.values, mode="sum")
    torch.testing.assert_close(sae.decode(sae.encode(x)), recon + weights["b_dec"])


def test_sparsify_saved_by_sparsify_itself(tmp_path):
    # eai-sparsify is in the test extra: this runs against the real library, never skipped
    import sparsify

    assert hasattr(sparsify, "SparseCoder"), f"{sparsify.__file__} is not EleutherAI's sparsify (pip install eai-sparsify)"
    coder = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=64, k=6))
    with torch.no_grad():
        for param in coder.parameters():
            param.normal_()
    coder.save_to_disk(tmp_path / "layers.2")
    ours = load_sae(tmp_path / "layers.2")
    assert ours.cfg.site == "blocks.2.hook_resid_post"
    x = torch.randn(20, 16)
    top_acts, top_indices, _ = coder.encode(x)
    expected = torch.zeros(20, 64).scatter(-1, top_indices, top_acts)
    torch.testing.assert_close(ours.encode(x), expected)
    torch.testing.assert_close(ours.decode(ours.encode(x)), coder.decode(top_acts, top_indices))


@pytest.mark.parametrize(
    "hookpoint, site",
    [
        ("layers.6", "blocks.6.hook_resid_post"),
        ("layers.6.mlp", "blocks.6.hook_mlp_out"),
        ("layers.6.mlp.down_proj", "blocks.6.hook_mlp_out"),
        ("layers.6.self_attn", "blocks.6.hook_attn_out"),
        ("model.layers.12", "blocks.12.hook_resid_post"),
        ("h.3.attn", "blocks.3.hook_attn_out"),
    ],
)
def test_sparsify_hookpoints(hookpoint, site):
    assert sparsify_hookpoint_to_site(hookpoint) == site


def test_sparsify_hookpoints_that_cannot_be_mapped(tmp_path):
    with pytest.raises(ValueError, match="ambiguous"):
        sparsify_hookpoint_to_site("layers.6.mlp.act_fn")
    with pytest.raises(ValueError, match="does not name a block output"):
        sparsify_hookpoint_to_site("embed_tokens")
    write_sparsify_folder(tmp_path / "layers.6.mlp.act_fn")
    with pytest.raises(SAEFormatError, match="cannot map to an interplab site.*pass site="):
        load_sae(tmp_path / "layers.6.mlp.act_fn")
    sae = load_sae(tmp_path / "layers.6.mlp.act_fn", site="blocks.6.mlp.hook_post")
    assert sae.cfg.site == "blocks.6.mlp.hook_post"


def test_sparsify_refuses_transcoders_and_groupmax(tmp_path):
    write_sparsify_folder(tmp_path / "a" / "layers.1", transcode=True)
    with pytest.raises(SAEFormatError, match="transcoders"):
        load_sae(tmp_path / "a" / "layers.1")
    write_sparsify_folder(tmp_path / "b" / "layers.1", activation="groupmax")
    with pytest.raises(SAEFormatError, match="groupmax"):
        load_sae(tmp_path / "b" / "layers.1")


# ---- bad input -------------------------------------------------------------------------------------


def test_unknown_saelens_architecture_is_refused(tmp_path):
    sae = trained_looking_sae("relu", input_scale=1.0)
    save_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEFormatError, match=r"cfg.json: SAELens architecture 'gated' is not supported"):
        load_sae(tmp_path)


def test_unsupported_saelens_normalisation_and_head_index_are_refused(tmp_path):
    save_saelens(trained_looking_sae("relu", input_scale=1.0), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEFormatError, match="normalize_activations='layer_norm' is not supported"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"], "hook_head_index": 3}}))
    with pytest.raises(SAEFormatError, match="single attention head"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"], "hook_name": "blocks.0.attn.hook_q"}}))
    with pytest.raises(SAEFormatError, match="cannot map to an interplab site"):
        load_sae(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize("layout", ["interplab", "saelens"])
def test_corrupt_or_truncated_safetensors_names_the_file(tmp_path, damage, layout):
    sae = trained_looking_sae("topk")
    (save_sae if layout == "interplab" else save_saelens)(sae, tmp_path)
    weights = tmp_path / ("sae.safetensors" if layout == "interplab" else "sae_weights.safetensors")
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"\x07not a safetensors file" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(SAEFormatError, match=rf"{weights.name} is not a readable safetensors.*truncated or corrupt"):
        load_sae(tmp_path)


def test_weights_not_matching_the_config_width(tmp_path):
    sae = trained_looking_sae("topk")
    save_sae(sae, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["d_in"] = 20
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SAEFormatError, match=r"sae.safetensors: W_enc has shape \(16, 64\) but the config \(d_in=20, d_sae=64\)"):
        load_sae(tmp_path)

    write_sparsify_folder(tmp_path / "sp" / "layers.0", d_in=16)
    cfg = json.loads((tmp_path / "sp" / "layers.0" / "cfg.json").read_text())
    (tmp_path / "sp" / "layers.0" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 24}))
    with pytest.raises(SAEFormatError, match="W_enc has shape"):
        load_sae(tmp_path / "sp" / "layers.0")


def test_wrong_config_values_and_versions(tmp_path):
    save_sae(trained_looking_sae("topk"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, fragment in [
        ({"config": {**config["config"], "k": 0}}, "needs k"),
        ({"config": {**config["config"], "family": "gated"}}, "family 'gated' is unknown"),
        ({"config": {**config["config"], "width": 3}}, "unknown SAEConfig field"),
        ({"format_version": 99}, "format_version 99 is not supported.*upgrade interplab"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(SAEFormatError, match=fragment):
            load_sae(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="config.json is not valid JSON"):
        load_sae(tmp_path)


def test_missing_tensors_and_unknown_layouts(tmp_path):
    save_sae(trained_looking_sae("jumprelu"), tmp_path / "a")
    tensors = {"W_enc": torch.zeros(16, 64), "b_enc": torch.zeros(64), "W_dec": torch.zeros(64, 16),
               "b_dec": torch.zeros(16), "input_scale": torch.ones(())}
    save_file(tensors, tmp_path / "a" / "sae.safetensors")
    with pytest.raises(SAEFormatError, match=r"missing \['threshold'\]"):
        load_sae(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "weights.bin").write_bytes(b"")
    with pytest.raises(SAEFormatError, match="holds no SAE layout"):
        load_sae(tmp_path / "b")
    with pytest.raises(SAEFormatError, match="is not a folder"):
        load_sae(tmp_path / "nowhere")
