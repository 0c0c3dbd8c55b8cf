"""A TopK SAE on the real TinyStories-656K model, trained on CPU from the shared TinyStories sample,
then read, searched and steered with through the CLI.

Targets (on held-out windows): FVU <= 0.15, CE loss recovered >= 0.85, L0 <= 32, dead < 10%.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from interplab.cli import app
from interplab.sae.config import SAEConfig
from interplab.sae.downstream import evaluate_downstream
from interplab.sae.store import ActivationStore, StoreConfig, corpus_windows, harvest_to_disk, read_manifest
from interplab.sae.train import TrainConfig, train_sae

pytestmark = pytest.mark.slow

SITE = "blocks.0.hook_resid_post"
TRAIN_TOKENS = 100_000
"""Activation rows harvested once, to disk (shards of 128 windows: about the first 900 windows of 128
tokens, 114k rows), then read over and over: 600 steps of 1,024 rows. Measured: FVU 0.125, CE loss
recovered 0.957 (0.910 against mean ablation), L0 16, no dead latents; 60k rows, 400 steps and
d_sae 512 missed the FVU target (0.165). The earlier 400k rows per pass, re-harvested each pass
for 1,000 steps, ran the model on about 9x as many tokens for the same targets."""
TRAIN_STEPS = 600
HELD_OUT_FROM = 3600
"""First held-out window (the sample holds about 3,990 windows of 128 tokens)."""


@pytest.fixture(scope="module")
def trained(tinystories, corpus, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tinystories_sae")
    store_cfg = StoreConfig(sites=(SITE,), context_length=128, batch_size=1024, buffer_tokens=32_768,
                            model_batch_size=32)
    started, cpu = time.perf_counter(), time.process_time()
    harvest_to_disk(tinystories, corpus, out / "acts", store_cfg, n_tokens=TRAIN_TOKENS, contexts_per_shard=128)
    store = ActivationStore.from_disk(out / "acts", batch_size=1024, buffer_tokens=32_768, repeat=True)
    sae_cfg = SAEConfig(d_in=128, d_sae=1024, family="topk", k=16, site=SITE, model_id=tinystories.model_id)
    train_cfg = TrainConfig(n_steps=TRAIN_STEPS, lr=1e-3, dead_after_tokens=200_000, progress=False, tensorboard=False)
    sae = train_sae(sae_cfg, store.batches(), train_cfg, out_dir=out)
    seconds = time.perf_counter() - started, time.process_time() - cpu
    print(f"\nharvested and trained in {seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU")
    return sae.eval(), out / "sae"


@pytest.fixture(scope="module")
def held_out(tinystories, corpus):
    return corpus_windows(tinystories, corpus, context_length=128, skip_contexts=HELD_OUT_FROM, n_contexts=64)


def test_topk_sae_reaches_the_targets(trained, tinystories, held_out):
    sae, _ = trained
    zero = evaluate_downstream(tinystories, sae, held_out, batch_size=16)
    mean = evaluate_downstream(tinystories, sae, held_out, batch_size=16, ablation="mean").downstream
    a, d = zero.activation, zero.downstream
    print(f"\nFVU {a.fvu:.4f}  L0 {a.l0:.1f}  dead {a.dead_fraction:.2%}  CE clean {d.clean_loss:.3f}  "
          f"with SAE {d.sae_loss:.3f}  zero-ablated {d.ablated_loss:.3f}  recovered {d.ce_loss_recovered:.4f}  "
          f"(mean-ablation baseline {mean.ce_loss_recovered:.4f})  KL {d.kl_sae:.4f}")
    assert a.fvu <= 0.15
    assert d.ce_loss_recovered >= 0.85
    assert mean.ce_loss_recovered >= 0.85
    assert a.l0 <= 32
    assert a.dead_fraction < 0.10
    assert a.n_tokens == int((held_out != 1).sum())  # BOS is not evaluated


def test_cli_reads_searches_and_steers_with_the_trained_sae(trained, tinystories, corpus, tmp_path):
    _, folder = trained
    runner = CliRunner()
    model = ["--model", tinystories.model_id]

    def run(*args):
        result = runner.invoke(app, ["sae", *map(str, args)], catch_exceptions=False, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.stdout

    report = json.loads(run("eval", folder, "--corpus", corpus, "--n-contexts", 8, "--skip-contexts", HELD_OUT_FROM,
                            "--json", *model))
    assert report["site"] == SITE and report["ce_loss_recovered"] > 0.85
    assert "CE loss recovered" in run("eval", folder, "--corpus", corpus, "--n-contexts", 4, *model)
    index = tmp_path / "features.db"
    run("features", folder, "--corpus", corpus, "--out", index, "--n-contexts", 256, "--context-length", 64, *model)
    from interplab.sae.features import FeatureIndex

    with FeatureIndex(index) as idx:
        density = idx.db.execute("SELECT id FROM features ORDER BY density DESC LIMIT 1").fetchone()[0]
        label = idx.summary(density).label
    word = label.split("'")[1]
    assert str(density) in run("search", index, word, "--n-results", 50)
    card = tmp_path / "card.html"
    run("card", index, density, "--out", card)
    assert "<svg" in card.read_text() and "Top-activating contexts" in card.read_text()
    assert "Lily" in run("inspect", folder, "Lily went to the park.", "--index", index, *model)
    assert "steer" in run("steer", folder, "--feature", density, "--prompt", "Once upon a time", "--scale", 8,
                          "--max-new-tokens", 5, *model)
    assert "bias" in run("steer", folder, "--feature", density, "--prompt", "Once upon a time", "--method", "bias",
                         "--only-when-active", "--max-new-tokens", 5, *model)
    table = run("compare-steering", folder, "--feature", density, "--neutral", corpus, "--prompt", "Once upon a",
                "--prompt", "The dog", "--n-contexts", 4, *model)
    assert "logit_bias" in table and "clamp" in table and "gain / damage" in table


def test_cli_train_harvests_to_disk_and_bad_input_exits_2(tinystories, corpus, tmp_path):
    runner = CliRunner()
    args = ["sae", "train", "--model", tinystories.model_id, "--site", "blocks.1.hook_resid_pre", "--corpus",
            str(corpus), "--out", str(tmp_path / "run"), "--d-sae", "256", "--k", "8", "--steps", "20",
            "--batch-size", "256", "--buffer-tokens", "2048", "--n-tokens", "12000", "--harvest", str(tmp_path / "acts")]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "sae" / "config.json").is_file()
    manifest = read_manifest(tmp_path / "acts")
    assert manifest["complete"] and sum(s["n_tokens"] for s in manifest["shards"]) == 12000  # exactly
    too_long = runner.invoke(app, [*args[:-2], "--context-length", "1024", "--out", str(tmp_path / "other")])
    assert too_long.exit_code == 2 and "512" in too_long.output
    wrong_width = runner.invoke(app, ["sae", "eval", str(tmp_path / "run" / "sae"), "--corpus", str(corpus),
                                      "--site", "blocks.0.mlp.hook_post", "--model", tinystories.model_id])
    assert wrong_width.exit_code == 2 and "d_in=128" in wrong_width.output and "width 384" in wrong_width.output
