"""Multi-file artifacts are written whole and refused when their parts disagree (issue #11)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from interplab import files
from interplab.errors import ArtifactError, UserInputError
from interplab.sae import SAE, SAEConfig, SAEFormatError, load_sae, save_sae, save_saelens
from interplab.steering.vector import SteeringVector


def vector(seed: int, width: int = 8) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({1: torch.randn(width, generator=g), 2: torch.randn(width, generator=g)},
                          model_id=f"model-{seed}")


def sae(k: int, seed: int = 0) -> SAE:
    model = SAE(SAEConfig(d_in=8, d_sae=16, family="topk", k=k, site="blocks.1.hook_resid_post"),
                generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.b_enc.add_(seed)
    return model


def fail_on_json(monkeypatch, module):
    """Make the config write (the second file of the folder) fail, as a kill or full disk would."""
    def boom(path, data):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(module, "write_json", boom)


# --- steering vectors ------------------------------------------------------------------------

def test_failed_vector_save_leaves_the_old_vector_whole(tmp_path, monkeypatch):
    import interplab.steering.vector as module

    old = vector(0)
    old.save(tmp_path / "v")
    fail_on_json(monkeypatch, module)
    with pytest.raises(OSError, match="simulated"):
        vector(1).save(tmp_path / "v")
    loaded = SteeringVector.load(tmp_path / "v")
    assert loaded.model_id == "model-0"
    torch.testing.assert_close(loaded[1], old[1], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no temporary left behind


def test_hand_mixed_vector_folder_is_refused(tmp_path):
    vector(0).save(tmp_path / "a")
    vector(1).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "vectors.safetensors", tmp_path / "a" / "vectors.safetensors")
    with pytest.raises(ArtifactError, match=r"vectors.safetensors does not belong to .*config.json"):
        SteeringVector.load(tmp_path / "a")


def test_vector_without_digest_still_loads(tmp_path):
    """Folders written before digests existed keep loading."""
    v = vector(0)
    v.save(tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    del config["tensors_digest"]
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(SteeringVector.load(tmp_path / "v")[2], v[2])


def test_vector_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds other files"):
        vector(0).save(tmp_path / "runs")
    assert (tmp_path / "runs" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("field, value", [("site", 3), ("d_model", "8"), ("tensors", ["x"]),
                                          ("settings", "x"), ("model_id", 1), ("tensors_digest", 5)])
def test_wrong_vector_config_field_types_name_the_field_and_file(tmp_path, field, value):
    vector(0).save(tmp_path / "v")
    path = tmp_path / "v" / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=rf"config.json: field '{field}' .* must be"):
        SteeringVector.load(tmp_path / "v")


@pytest.mark.parametrize("direction", [torch.randn(8, dtype=torch.complex64),
                                       pytest.param(np.ones(8) * (1 + 2j), marks=pytest.mark.wrong_types)])
def test_complex_vector_is_refused(direction):
    with pytest.raises(UserInputError, match="complex"):
        SteeringVector({1: direction})


def test_complex_tensor_in_a_vector_file_is_refused(tmp_path):
    vector(0).save(tmp_path / "v")
    files.save_tensors(tmp_path / "v" / "vectors.safetensors",
                       {"blocks.1.hook_resid_post": torch.randn(8, dtype=torch.complex64),
                        "blocks.2.hook_resid_post": torch.randn(8, dtype=torch.complex64)})
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    del config["tensors_digest"]
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="complex"):
        SteeringVector.load(tmp_path / "v")


# --- SAEs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", [save_sae, save_saelens])
def test_failed_sae_save_leaves_the_old_sae_whole(tmp_path, monkeypatch, save):
    import interplab.sae.formats as module

    old = sae(k=2, seed=0)
    save(old, tmp_path / "sae")
    fail_on_json(monkeypatch, module)
    with pytest.raises(OSError, match="simulated"):
        save(sae(k=5, seed=1), tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.k == 2
    torch.testing.assert_close(loaded.b_enc, old.b_enc, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.mark.parametrize("save, weights", [(save_sae, "sae.safetensors"), (save_saelens, "sae_weights.safetensors")])
def test_hand_mixed_sae_folder_is_refused(tmp_path, save, weights):
    save(sae(k=2, seed=0), tmp_path / "a")
    save(sae(k=5, seed=1), tmp_path / "b")  # same shapes: only the digest tells them apart
    shutil.copy(tmp_path / "b" / weights, tmp_path / "a" / weights)
    with pytest.raises(SAEFormatError, match=rf"{weights} does not belong to"):
        load_sae(tmp_path / "a")


def test_sae_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="holds other files"):
        save_sae(sae(k=2), tmp_path / "out")
    assert (tmp_path / "out" / "data.bin").exists()


@pytest.mark.parametrize("change, fragment", [
    # a file's wrong field types reach SAEConfig's annotated constructor (hence wrong_types)
    pytest.param(lambda c: c["config"].update(d_sae="16"), r"d_sae must be a positive int, got '16'",
                 marks=pytest.mark.wrong_types),
    pytest.param(lambda c: c["config"].update(site=7), r"site must be a string", marks=pytest.mark.wrong_types),
    pytest.param(lambda c: c.update(config=[1, 2]), r"SAEConfig.from_dict expects a dict, got list",
                 marks=pytest.mark.wrong_types),
    (lambda c: c.update(tensors_digest=3), r"tensors_digest must be a string"),
])
def test_wrong_sae_config_field_types_name_the_file(tmp_path, change, fragment):
    save_sae(sae(k=2), tmp_path / "sae")
    path = tmp_path / "sae" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=rf"config.json.*{fragment}"):
        load_sae(tmp_path / "sae")
