"""A feature index of a transcoder layer: its top activations are the transcoder's latents on the
MLP's real input, its logit effects are W_U (γ ⊙ W_dec[f] / s_out), and it refuses another
transcoder (or an SAE)."""

from __future__ import annotations

import re

import pytest
import torch

from interplab.errors import UserInputError
from interplab.sae.config import SAEConfig
from interplab.sae.features import FeatureIndex, build_feature_index, final_norm_scale
from interplab.sae.model import SAE
from interplab.sae.transcoder import Transcoder, TranscoderConfig
from tests.tiny import tiny_model

LAYER = 1


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _transcoder(seed: int, layer: int = LAYER) -> Transcoder:
    tc = Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=24, layer=layer, k=4),
                    generator=torch.Generator().manual_seed(seed)).eval()
    with torch.no_grad():
        tc.input_scale.fill_(3.0)
        tc.output_scale.fill_(0.5)
    return tc


@pytest.fixture(scope="module")
def transcoder():
    return _transcoder(0)


@pytest.fixture(scope="module")
def windows():
    ids = torch.randint(4, 96, (24, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    return ids


@pytest.fixture(scope="module")
def index(llama, transcoder, windows, tmp_path_factory):
    path = tmp_path_factory.mktemp("tc_index") / "features-1.db"
    return build_feature_index(llama, transcoder, windows, path, n_top=4, n_bins=8, batch_size=5)


def _mlp_input_latents(model, transcoder, ids):
    """Brute force: the transcoder's encode of what the layer's MLP module really receives."""
    seen = []
    mlp = model.block_module(LAYER, model.arch.mlp)
    handle = mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        handle.remove()
    return transcoder.encode(seen[0]).detach()  # (b, seq, d_sae)


def test_top_activations_are_the_transcoders_latents_on_the_real_mlp_input(llama, transcoder, windows, index):
    assert index.kind == "transcoder" and index.meta["layer"] == LAYER and index.d_sae == 24
    checked = 0
    for feature in range(24):
        for top in index.top_contexts(feature)[:2]:
            acts = _mlp_input_latents(llama, transcoder, windows[top.context:top.context + 1])[0, :, feature]
            acts[0] = 0.0  # BOS is not indexed
            torch.testing.assert_close(torch.tensor(top.acts), acts, atol=2e-2, rtol=1e-2)  # stored as float16
            assert top.max_pos == int(acts.argmax()) and top.activation == pytest.approx(float(acts.max()), rel=1e-4)
            checked += 1
    assert checked >= 10


def test_the_first_top_context_is_the_corpus_maximum(llama, transcoder, windows, index):
    latents = _mlp_input_latents(llama, transcoder, windows)
    latents[:, 0] = 0.0
    best = latents.amax(dim=(0, 1))  # (d_sae,)
    for feature in range(24):
        assert index.summary(feature).max_act == pytest.approx(float(best[feature]), rel=1e-4, abs=1e-6)


def test_logit_effects_are_the_decoder_rows_through_the_unembedding(llama, transcoder, index):
    direction = transcoder.W_dec[3].detach() / transcoder.output_scale * final_norm_scale(llama)
    effects = llama.unembed.weight.detach() @ direction
    promoted = index.logit_effects(3, n=3).promoted
    assert [v for _, v in promoted] == pytest.approx(effects.topk(3).values.tolist(), rel=1e-4)


def test_another_transcoder_or_an_sae_is_refused(index, transcoder):
    FeatureIndex(index.path, sae=transcoder).close()
    with pytest.raises(UserInputError, match="not from this layer-1 transcoder.*weights digest"):
        FeatureIndex(index.path, sae=_transcoder(5))
    with pytest.raises(UserInputError, match="layer 1 there, 0 here"):
        FeatureIndex(index.path, sae=_transcoder(0, layer=0))
    sae = SAE(SAEConfig(d_in=32, d_sae=24, family="topk", k=4, site="blocks.1.hook_resid_mid"))
    with pytest.raises(UserInputError, match="is of a transcoder, not of an SAE"):
        FeatureIndex(index.path, sae=sae)


def test_a_transcoder_for_another_model_is_refused_before_the_model_runs(llama, windows, tmp_path):
    wide = Transcoder(TranscoderConfig(d_in=64, d_out=64, d_sae=8, layer=0, k=2))
    with pytest.raises(UserInputError, match="d_in=64.*hidden_size=32"):
        build_feature_index(llama, wide, windows, tmp_path / "f.db")
    with pytest.raises(UserInputError, match="valid 0..2"):
        build_feature_index(llama, _transcoder(0, layer=7), windows, tmp_path / "f.db")
    assert not (tmp_path / "f.db").exists()


def test_cli_indexes_a_transcoder_set_layer_next_to_the_set(tinystories, corpus, tmp_path):
    from typer.testing import CliRunner

    from interplab.cli import app
    from interplab.sae.transcoder import save_transcoders

    width = tinystories.d_model
    tcs = {L: Transcoder(TranscoderConfig(d_in=width, d_out=width, d_sae=16, layer=L, k=4,
                                          model_id=str(tinystories.model_id)), generator=torch.Generator().manual_seed(L))
           for L in range(2)}
    folder = save_transcoders(tcs, tmp_path / "tc")
    runner = CliRunner()
    args = ["sae", "features", str(folder), "--corpus", str(corpus), "--n-contexts", "6", "--context-length", "12"]
    result = runner.invoke(app, [*args, "--layers", "all"])
    assert result.exit_code == 0, result.output
    for layer in (0, 1):
        with FeatureIndex(folder / f"features-{layer}.db", sae=tcs[layer]) as index:
            assert index.kind == "transcoder" and index.meta["layer"] == layer and index.meta["n_contexts"] == 6
    with pytest.raises(UserInputError, match="layer 1 there, 0 here"):
        FeatureIndex(folder / "features-1.db", sae=tcs[0])
    for extra, message in ((["--layers", "1"], "already exists"), ([], r"pass --layers .* has layers \[0, 1\]"),
                           (["--layers", "1,4"], r"layers \[4\] are not in the transcoder set"),
                           (["--layers", "0,1", "--out", str(tmp_path / "x.db")], "--out names one file"),
                           (["--layers", "0", "--site", "blocks.0.hook_resid_mid"], "--site is for SAEs")):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert re.search(message, " ".join(result.output.split())), result.output
    result = runner.invoke(app, ["sae", "features", str(tmp_path), "--corpus", str(corpus), "--layers", "0"])
    assert result.exit_code == 2 and "--layers is for a transcoder set folder" in result.output
