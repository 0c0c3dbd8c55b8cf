"""Grokking on modular addition: data, model, Fourier tools, bad input, and (slow) the phase change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from interplab.errors import ArtifactError
from interplab.toy.grokking import (
    GrokkingConfig, GrokkingHistory, GrokTransformer, embedding_frequency_norms, fourier_basis,
    key_frequencies, key_frequency_fraction, load_model, modular_addition_data, phase_steps,
    progress_measures, restricted_and_excluded_logits, save_run, summarize, train_grokking,
)

TINY = dict(p=13, d_model=16, n_heads=2, d_mlp=32, steps=20, eval_every=5, checkpoint_every=10)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("p", [1, 2, 4, 9, 100, -7])
def test_p_must_be_a_prime_above_two(p):
    with pytest.raises(ValueError, match="prime > 2") as error:
        GrokkingConfig(p=p)
    assert "permutation" in str(error.value)  # the message explains why


@pytest.mark.parametrize("changes", [dict(train_fraction=0.0), dict(train_fraction=1.0), dict(d_model=30, n_heads=4),
                                     dict(d_mlp=0), dict(steps=-1), dict(lr=0.0)])
def test_other_bad_configs_are_rejected(changes):
    with pytest.raises(ValueError):
        GrokkingConfig(**changes)


def test_paper_settings():
    paper = GrokkingConfig.paper()
    assert (paper.p, paper.train_fraction, paper.d_model, paper.n_heads, paper.d_mlp) == (113, 0.3, 128, 4, 512)
    assert (paper.lr, paper.weight_decay, paper.betas) == (1e-3, 1.0, (0.9, 0.98))


# ----------------------------------------------------------------------------- data and model


def test_modular_addition_data():
    data = modular_addition_data(7, 0.3, seed=0)
    assert data.tokens.shape == (49, 3)
    assert torch.equal(data.labels, (data.tokens[:, 0] + data.tokens[:, 1]) % 7)
    assert (data.tokens[:, 2] == 7).all()  # "=" token
    assert len(data.train_index) == round(0.3 * 49) and len(data.test_index) == 49 - len(data.train_index)
    assert not set(data.train_index.tolist()) & set(data.test_index.tolist())
    assert torch.equal(modular_addition_data(7, 0.3, seed=0).train_index, data.train_index)  # fixed split


def test_model_is_causal_and_last_only_matches():
    torch.manual_seed(0)
    model = GrokTransformer(GrokkingConfig(**TINY))
    tokens = modular_addition_data(13, 0.5).tokens
    full = model(tokens)
    assert full.shape == (169, 3, 13)
    torch.testing.assert_close(model(tokens, last_only=True)[:, -1], full[:, -1])
    changed = tokens.clone()
    changed[:, 1] = 0
    torch.testing.assert_close(model(changed)[:, 0], full[:, 0])  # position 0 cannot see position 1


def test_submodules_are_hookable_with_plain_torch_hooks():
    model = GrokTransformer(GrokkingConfig(**TINY))
    names = dict(model.named_modules())
    for name in ["embed", "pos_embed", "blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
                 "blocks.0.attn.o_proj", "blocks.0.mlp.in_proj", "blocks.0.mlp.act", "blocks.0.mlp.out_proj",
                 "unembed"]:
        assert name in names
    seen = {}
    handle = names["blocks.0.mlp.act"].register_forward_hook(lambda m, i, o: seen.setdefault("post", o))
    try:
        model(modular_addition_data(13, 0.5).tokens[:4])
    finally:
        handle.remove()
    assert seen["post"].shape == (4, 3, 32) and (seen["post"] >= 0).all()


def test_save_and_load_roundtrip(tmp_path):
    run = train_grokking(GrokkingConfig(**TINY))
    save_run(run, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["format_version"] == 1
    tokens = run.data.tokens
    torch.testing.assert_close(load_model(tmp_path)(tokens), run.model(tokens))
    first = load_model(tmp_path, step=0)
    torch.testing.assert_close(first.embed.weight, run.checkpoints[0]["embed.weight"])
    assert sorted(run.checkpoints) == [0, 10, 20]
    with pytest.raises(ArtifactError, match="step_000010"):
        load_model(tmp_path, step=7)


def test_run_folder_is_whole_or_unchanged(tmp_path, monkeypatch):
    import interplab.toy.grokking as grokking

    run = train_grokking(GrokkingConfig(**TINY))
    save_run(run, tmp_path / "run")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    def dying_write(path, data):  # history.json, the last file, fails
        if Path(path).name == "history.json":
            raise OSError("disk full (simulated)")
        return real_write(path, data)

    real_write = grokking.write_json
    monkeypatch.setattr(grokking, "write_json", dying_write)
    other = train_grokking(GrokkingConfig(**{**TINY, "seed": 1}))
    with pytest.raises(OSError, match="simulated"):
        save_run(other, tmp_path / "run")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- Fourier tools


def test_fourier_basis_is_orthonormal():
    basis = fourier_basis(13)
    torch.testing.assert_close(basis @ basis.T, torch.eye(13), atol=1e-5, rtol=0)


def _embedding_with_frequencies(p: int, d_model: int, freqs: list[int], noise: float) -> GrokTransformer:
    model = GrokTransformer(GrokkingConfig(p=p, d_model=d_model, n_heads=1, d_mlp=8))
    x = torch.arange(p, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    W = noise * torch.randn(p, d_model, generator=g)
    for i, k in enumerate(freqs):
        W[:, 2 * i] += torch.cos(2 * math.pi * k * x / p)
        W[:, 2 * i + 1] += torch.sin(2 * math.pi * k * x / p)
    with torch.no_grad():
        model.embed.weight[:p] = W
    return model


def test_key_frequencies_found_in_a_planted_embedding():
    model = _embedding_with_frequencies(31, 16, [3, 7, 11], noise=0.05)
    norms = embedding_frequency_norms(model)
    assert norms.shape == (15,)
    keys = key_frequencies(norms)
    assert keys == [3, 7, 11]
    assert key_frequency_fraction(model, keys) > 0.9
    flat = torch.ones(56)  # nothing stands out (as at initialisation): the strongest one is returned
    flat[9] = 1.5
    assert key_frequencies(flat) == [10]


def test_restricted_and_excluded_logits_split_the_key_terms():
    p, keys = 13, [2, 5]
    a = torch.arange(p).repeat_interleave(p).float()[:, None]  # (p*p, 1), row order a * p + b
    b = torch.arange(p).repeat(p).float()[:, None]
    c = torch.arange(p).float()[None, :]  # (1, p)
    key_part = sum(torch.cos(2 * math.pi * k * (a + b - c) / p) for k in keys)
    other = 0.3 * torch.cos(2 * math.pi * 4 * (a - b) / p) + 0.2 * torch.sin(2 * math.pi * 1 * a / p) * c / p
    logits = key_part + other + 0.7
    restricted, excluded = restricted_and_excluded_logits(logits, p, keys)
    torch.testing.assert_close(restricted, key_part + 0.7 + other.mean(0, keepdim=True), atol=1e-4, rtol=0)
    torch.testing.assert_close(excluded, other + 0.7, atol=1e-4, rtol=0)


def test_phase_steps_on_a_made_up_history():
    history = GrokkingHistory(step=[0, 10, 20, 30, 40], train_accuracy=[0.0, 0.5, 0.995, 1.0, 1.0],
                              test_accuracy=[0.0, 0.0, 0.02, 0.5, 0.96])
    assert phase_steps(history) == (20, 40)
    assert phase_steps(GrokkingHistory(step=[0], train_accuracy=[0.2], test_accuracy=[0.1])) == (None, None)


def test_cli_tiny_run_writes_outputs(tmp_path):
    from typer.testing import CliRunner

    from interplab.cli import app

    args = ["toy", "grokking", "--out", str(tmp_path / "run"), "--p", "13", "--d-model", "16", "--n-heads", "2",
            "--d-mlp", "32", "--steps", "30", "--checkpoint-every", "10", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tmp_path = tmp_path / "run"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["config"]["p"] == 13
    assert len(summary["progress_measures"]["restricted_loss"]) == 4
    for name in ["grokking_curves", "embedding_fourier", "progress_measures"]:
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "step_000030.safetensors").exists()


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    from interplab.toy import grokking as gk

    config = GrokkingConfig(p=13, d_model=16, n_heads=2, d_mlp=32, steps=60, checkpoint_every=20, eval_every=10,
                            stop_after_generalisation=None)
    whole = gk.train_grokking(config)
    real_log, calls = gk._log, []

    def dying_log(history, step, *args):
        if step == 50:  # killed after the state of step 40 was written
            raise KeyboardInterrupt
        calls.append(step)
        return real_log(history, step, *args)

    monkeypatch.setattr(gk, "_log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        gk.train_grokking(config, state_dir=tmp_path)
    assert (tmp_path / gk.STATE_FILE).exists() and (tmp_path / "checkpoints" / "step_000040.safetensors").exists()
    monkeypatch.setattr(gk, "_log", lambda history, step, *args: (calls.append(step), real_log(history, step, *args)))
    calls.clear()
    resumed = gk.train_grokking(config, state_dir=tmp_path)
    assert calls[0] == 40  # continued from the saved state, not from step 0
    assert resumed.history == whole.history and resumed.steps_done == whole.steps_done
    assert sorted(resumed.checkpoints) == sorted(whole.checkpoints) == [0, 20, 40, 60]
    for step in whole.checkpoints:
        for name, value in whole.checkpoints[step].items():
            torch.testing.assert_close(resumed.checkpoints[step][name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        gk.train_grokking(GrokkingConfig(p=13, d_model=16, n_heads=2, d_mlp=32, steps=60, lr=1e-3), state_dir=tmp_path)


def test_cli_resume_and_overwrite_rules(tmp_path):
    from typer.testing import CliRunner

    from interplab.cli import app

    args = ["toy", "grokking", "-o", str(tmp_path), "--p", "13", "--d-model", "16", "--n-heads", "2",
            "--d-mlp", "32", "--steps", "20", "--checkpoint-every", "10", "--no-progress"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "already exists" in refused.output and "Traceback" not in refused.output
    assert CliRunner().invoke(app, args + ["--resume"]).exit_code == 0
    state = tmp_path.with_name(tmp_path.name + ".training")
    assert (tmp_path / "summary.json").is_file() and not state.exists()  # state removed once the run is written
    finished = CliRunner().invoke(app, args + ["--resume"])
    assert finished.exit_code == 0 and "nothing to resume" in finished.output
    new = tmp_path.parent / "new"
    (tmp_path.parent / "new.training").mkdir()  # an interrupted run's state: refused without --resume
    refused = CliRunner().invoke(app, args[:2] + ["-o", str(new)] + args[4:])
    assert refused.exit_code == 2 and "interrupted run" in refused.output and not new.exists()
    both = CliRunner().invoke(app, args + ["--resume", "--overwrite"])
    assert both.exit_code == 2 and "give one of them" in both.output


def test_cli_rejects_composite_p(tmp_path):
    from typer.testing import CliRunner

    from interplab.cli import app

    result = CliRunner().invoke(app, ["toy", "grokking", "--out", str(tmp_path / "run"), "--p", "100",
                                      "--no-progress"])
    assert result.exit_code == 2 and "prime > 2" in result.output and "Traceback" not in result.output
    assert "╭" not in result.output  # one plain line, no Typer box


# ----------------------------------------------------------------------------- the phase change (slow)


@pytest.fixture(scope="module")
def grokked():
    # the CPU defaults (p = 113, 30% train, d_model 64, lr 5e-3), stopping at the first logged step
    # with 95% test accuracy (step 960 with seed 0; the steps after it show nothing more that is tested)
    run = train_grokking(GrokkingConfig(stop_after_generalisation=0))
    keys = key_frequencies(embedding_frequency_norms(run.model))
    return run, keys


@pytest.mark.slow
def test_memorises_first_then_generalises(grokked):
    run, keys = grokked
    memorised, generalised = phase_steps(run.history)
    assert memorised is not None and generalised is not None
    assert generalised > memorised  # generalisation after memorisation ...
    assert generalised >= 3 * memorised  # ... and well after it
    at_memorisation = run.history.step.index(memorised)
    assert run.history.test_accuracy[at_memorisation] < 0.2  # test accuracy still low when train hits 99%
    assert run.history.test_accuracy[-1] > 0.95 and run.history.train_accuracy[-1] > 0.99


@pytest.mark.slow
def test_a_few_key_frequencies_carry_the_embedding(grokked):
    run, keys = grokked
    assert 2 <= len(keys) <= 8  # a handful of the 56 frequencies
    assert key_frequency_fraction(run.model, keys) > 0.6


@pytest.mark.slow
def test_progress_measures_move_before_test_accuracy(grokked):
    run, keys = grokked
    measures = progress_measures(run, keys)
    memorised, generalised = phase_steps(run.history)
    summary = summarize(run, keys)
    assert summary.generalisation_step == generalised
    # at the last checkpoint before generalisation, the restricted loss is already well below the test loss
    before = max(s for s in measures.step if s < generalised)
    i, j = measures.step.index(before), run.history.step.index(before)
    assert measures.restricted_loss[i] < 0.5 * run.history.test_loss[j]
    # and the excluded loss ends far above the train loss: the model relies on the key frequencies
    assert measures.excluded_loss[-1] > 10 * run.history.train_loss[-1]
