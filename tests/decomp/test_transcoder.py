"""Transcoders: the MLP input they read is the MLP's real input, folders round-trip, training
from one harvest lowers the error, bad input is refused, and the CLI answers mistakes with exit 2."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from interplab.errors import UserInputError
from interplab.hooks import HookSession
from interplab.sae.train import TrainConfig
from interplab.sae.transcoder import (Transcoder, TranscoderConfig, load_transcoders, save_transcoders)
from interplab.sae.transcoder_train import evaluate_transcoders, splice_fns, train_transcoders
from tests.tiny import tiny_model

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])


def _logits(model, fns=None):
    session = HookSession(model, fns).attach() if fns else None
    try:
        with torch.no_grad():
            return model.hf(input_ids=IDS).logits
    finally:
        if session:
            session.remove()


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt_neox"])
def test_the_spliced_input_is_the_mlps_own_input(kind):
    """Recomputing each MLP from the x the splice hands over reproduces the model exactly."""
    model = tiny_model(kind)
    fake = {L: Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=8, layer=L, k=2)) for L in range(3)}
    mlps = {L: model.block_module(L, model.arch.mlp) for L in range(3)}
    post = {L: model.block_module(L, model.arch.mlp_out) for L in range(3)} if model.arch.mlp_out != model.arch.mlp else {}

    def recompute(layer, x, y):  # .forward: the MLP's own hooks (the splice itself) must not run again
        out = mlps[layer].forward(x)
        return post[layer].forward(out) if layer in post else out

    torch.testing.assert_close(_logits(model, splice_fns(model, fake, None, recompute)), _logits(model))


def test_folders_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    saved = {L: Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=16, layer=L, family=f, k=k, skip=True), generator=g)
             for L, f, k in ((0, "topk", 4), (2, "jumprelu", None))}
    loaded = load_transcoders(save_transcoders(saved, tmp_path / "tc"))
    x = torch.randn(5, 32)
    for L in saved:
        torch.testing.assert_close(loaded[L](x), saved[L](x))
        assert loaded[L].cfg == saved[L].cfg


def test_training_from_one_harvest_beats_a_fresh_transcoder():
    model = tiny_model("llama")
    texts = [" ".join(f"w{(i * 7 + j * 3) % 80}" for j in range(30)) for i in range(40)]
    windows = IDS.repeat(4, 1)
    fresh = {L: Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=64, layer=L, k=8)) for L in (0, 1)}
    trained = train_transcoders(model, texts, [0, 1], TrainConfig(n_steps=30, lr=5e-3, progress=False, tensorboard=False),
                                d_sae=64, k=8, context_length=16, batch_size=64, buffer_tokens=256)
    for L, tc in fresh.items():  # give the fresh ones the trained scales, so only the weights differ
        tc.input_scale.copy_(trained[L].input_scale)
        tc.output_scale.copy_(trained[L].output_scale)
    before, after = evaluate_transcoders(model, fresh, windows), evaluate_transcoders(model, trained, windows)
    assert after.kl < 0.75 * before.kl  # (the random model's CE barely depends on its MLPs; KL does)


def test_refusals():
    with pytest.raises(UserInputError, match="k in 1..d_sae"):
        TranscoderConfig(d_in=4, d_out=4, d_sae=8, layer=0, k=9)
    with pytest.raises(UserInputError, match="reads MLP input of width 32"):
        Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=8, layer=0, k=2))(torch.zeros(3, 5))
    with pytest.raises(UserInputError, match="3 blocks"):
        train_transcoders(tiny_model("llama"), ["w1 w2"], [7], TrainConfig(n_steps=1), d_sae=8, k=2)


def test_cli_mistakes_exit_2(tmp_path):
    from interplab.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["sae", "graph", str(tmp_path / "missing"), "--prompt", "hi", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no such" in result.output
    result = runner.invoke(app, ["sae", "bench", str(tmp_path / "missing"), "--out", str(tmp_path), "--ks", "1,x"])
    assert result.exit_code == 2 and "--ks" in result.output


def test_cli_graph_writes_the_graph_and_prints_every_check(tinystories, tmp_path):
    """A successful `sae graph` run on TinyStories-656K with random transcoders: the JSON and page are
    written, and each checked feature set prints its prediction, constrained and free measurements."""
    import json

    from interplab.cli import app

    g = torch.Generator().manual_seed(0)
    width = tinystories.hf.config.hidden_size
    tcs = {L: Transcoder(TranscoderConfig(d_in=width, d_out=width, d_sae=32, layer=L, k=4,
                                          model_id=str(tinystories.model_id)), generator=g).eval()
           for L in range(tinystories.n_layers)}
    folder = save_transcoders(tcs, tmp_path / "tc")
    out = tmp_path / "graph"
    result = CliRunner().invoke(app, ["sae", "graph", str(folder), "--prompt", "Once upon a time there was",
                                      "--check", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "graph.json").read_text())
    assert (out / "graph.html").read_text().lower().startswith("<!doctype html>")
    checks = data["meta"]["interventions"]  # each of the top 2 features, then both together
    assert len(checks) == 3 and all({"predicted", "constrained", "crossings", "measured"} <= set(c) for c in checks)
    for c in checks:
        assert f"predicted {c['predicted']:+.3f}, constrained {c['constrained']:+.3f}" in " ".join(result.output.split())
