"""llama.cpp control-vector GGUF export/import."""

import numpy as np
import pytest
import torch

from interplab.steering.gguf_io import export_gguf, gguf_directions, import_gguf
from interplab.steering.vector import SteeringVector

gguf = pytest.importorskip("gguf")


def vector(layers=(1, 2, 5), d=16, **kw):
    g = torch.Generator().manual_seed(0)
    return SteeringVector({k: torch.randn(d, generator=g) for k in layers}, model_id="tiny-llama",
                          model_type="llama", method="mean_diff", dataset_fingerprint="f00d",
                          settings={"read": "last"}, **kw)


def test_round_trip_is_exact(tmp_path):
    v = vector()
    v.to_gguf(tmp_path / "v.gguf")
    back = SteeringVector.from_gguf(tmp_path / "v.gguf")
    assert back.layers == v.layers
    for layer in v.layers:
        assert torch.equal(back[layer], v[layer])
    assert (back.model_id, back.model_type, back.method, back.dataset_fingerprint) == (
        "tiny-llama", "llama", "mean_diff", "f00d")
    assert back.settings["read"] == "last"


def test_file_follows_the_llama_cpp_layout(tmp_path):
    export_gguf(vector(), tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))

    def string(key):
        field = reader.get_field(key)
        return bytes(field.parts[field.data[0]]).decode()

    assert string("general.architecture") == "controlvector"
    assert string("controlvector.model_hint") == "llama"
    field = reader.get_field("controlvector.layer_count")
    assert int(field.parts[field.data[0]][0]) == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.5"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in tensors.values())


def test_reads_a_repeng_style_file(tmp_path):
    """A file written the way repeng's ControlVector.export_gguf writes it (no interplab keys)."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 2)
    data = {3: np.arange(8, dtype=np.float32), 4: -np.arange(8, dtype=np.float32)}
    for layer, values in data.items():
        writer.add_tensor(f"direction.{layer}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    v = import_gguf(path)
    assert v.layers == [3, 4] and v.site == "hook_resid_post" and v.model_type == "mistral"
    assert torch.equal(v[4], -torch.arange(8, dtype=torch.float32))


def test_layer_mapping_and_limits(tmp_path):
    with pytest.warns(UserWarning, match="blocks.0.hook_resid_post is not written"):
        assert sorted(gguf_directions(vector(layers=(0, 3)))) == [3]
    pre = vector(layers=(2, 4), site="hook_resid_pre")
    assert sorted(gguf_directions(pre)) == [1, 3]  # block N's input = block N-1's output
    with pytest.raises(ValueError, match="ActAdd"):
        gguf_directions(SteeringVector({1: torch.ones(2, 4)}))
    with pytest.raises(ValueError, match="hook_mlp_out cannot be expressed"):
        gguf_directions(vector(site="hook_mlp_out"))
    with pytest.raises(ValueError, match="nothing left to export"), pytest.warns(UserWarning):
        gguf_directions(vector(layers=(0,)))


def test_import_errors(tmp_path):
    with pytest.raises(ValueError, match="no GGUF file"):
        import_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        import_gguf(tmp_path / "junk.gguf")
