"""llama.cpp control-vector GGUF files, as written by repeng and read by llama.cpp.

The format (repeng `ControlVector.export_gguf`; llama.cpp `common_control_vector_load`):

- `general.architecture` = "controlvector";
- `controlvector.model_hint` = the model's HF `model_type` (e.g. "llama");
- `controlvector.layer_count` = the number of direction tensors;
- one 1-D float32 tensor of n_embd values per layer, named `direction.{N}`.

Layer numbering. llama.cpp adds `direction.N` to the output of its block N (0-based:
`cur = build_cvec(cur, il)` at the end of layer `il`), which is interplab's
`blocks.N.hook_resid_post`; it refuses `direction.0` ("invalid (zero) direction tensor
layer index": the output of block 0 cannot be steered there). repeng's `ControlModel`
also adds direction N to the output of `model.layers[N]`, so the mapping is

    interplab blocks.N.hook_resid_post  <->  direction.N          (N >= 1)
    interplab blocks.N.hook_resid_pre   ->   direction.(N - 1)    (the same tensor: block N's input)

(repeng *reads* its training activations from `hidden_states[N]`, i.e. block N's input,
one block earlier than where it adds them; that is repeng's convention, not the file's.)
interplab also writes `interplab.metadata` (a JSON string with its own config), which
other readers ignore and which makes an interplab round trip exact.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from interplab.errors import ArtifactError
from interplab.files import atomic_write
from interplab.steering.vector import SteeringVector

ARCH = "controlvector"
METADATA_KEY = "interplab.metadata"
_DIRECTION_RE = re.compile(r"^direction\.(\d+)$")


def export_gguf(vector: SteeringVector, path: str | os.PathLike, *, model_hint: str | None = None) -> Path:
    """Write `vector` as a llama.cpp control vector. Block 0's output is skipped with a
    warning (llama.cpp cannot steer it); an ActAdd vector cannot be written (llama.cpp adds
    one vector at every position)."""
    gguf = _require_gguf()
    directions = gguf_directions(vector)
    hint = model_hint or vector.model_type or vector.model_id or "unknown"

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        writer.add_string(METADATA_KEY, json.dumps(_metadata(vector)))
        for index, direction in directions.items():
            writer.add_tensor(f"direction.{index}", direction)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def gguf_directions(vector: SteeringVector) -> dict[int, np.ndarray]:
    """llama.cpp layer index -> float32 array, following the mapping in the module docstring."""
    if vector.position_aligned:
        raise ValueError("an ActAdd (position-aligned) vector cannot be exported to GGUF: llama.cpp "
                         "adds one vector at every position")
    if vector.site not in ("hook_resid_post", "hook_resid_pre"):
        raise ValueError(f"llama.cpp adds control vectors to block outputs; a vector at {vector.site} "
                         "cannot be expressed there (use hook_resid_post or hook_resid_pre)")
    shift = 1 if vector.site == "hook_resid_pre" else 0
    out = {layer - shift: d.numpy().astype(np.float32) for layer, d in vector.directions.items()}
    if 0 in out or -1 in out:
        dropped = "blocks.0.hook_resid_post" if 0 in out else "blocks.0.hook_resid_pre (the embeddings)"
        warnings.warn(f"{dropped} is not written: llama.cpp refuses direction.0 / cannot steer there",
                      UserWarning, stacklevel=3)
        out = {k: v for k, v in out.items() if k >= 1}
    if not out:
        raise ValueError("nothing left to export: llama.cpp cannot steer block 0's output")
    return out


def import_gguf(path: str | os.PathLike) -> SteeringVector:
    """Read a control vector written by repeng, llama.cpp tools or interplab."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises several types on a damaged file
        raise ArtifactError(f"{path} is not a readable GGUF file ({err}): it is truncated or not a "
                            "control vector; export or download it again") from None
    arch = _string_field(reader, "general.architecture")
    if arch != ARCH:
        warnings.warn(f"{path} has general.architecture={arch!r}, not 'controlvector'", UserWarning,
                      stacklevel=2)
    directions = _read_directions(reader, path)
    meta = _interplab_metadata(reader)
    settings = dict(meta.get("settings", {}))
    settings.setdefault("gguf_file", path.name)
    return SteeringVector(
        directions, site="hook_resid_post",
        model_id=meta.get("model_id", ""),
        model_type=meta.get("model_type") or (_string_field(reader, f"{ARCH}.model_hint") or ""),
        method=meta.get("method", "gguf"), dataset_fingerprint=meta.get("dataset_fingerprint", ""),
        settings=settings,
    )


def _read_directions(reader, path: Path) -> dict[int, torch.Tensor]:
    directions = {}
    for tensor in reader.tensors:
        match = _DIRECTION_RE.match(tensor.name)
        if match is None:
            continue
        data = np.array(tensor.data, dtype=np.float32).reshape(-1)  # copy out of the memory map
        directions[int(match.group(1))] = torch.from_numpy(data)
    if not directions:
        raise ValueError(f"{path} holds no 'direction.N' tensors: it is not a control vector")
    return directions


def _metadata(vector: SteeringVector) -> dict:
    config = vector.config()
    return {key: config[key] for key in ("model_id", "model_type", "method", "dataset_fingerprint",
                                         "settings", "site")}


def _interplab_metadata(reader) -> dict:
    text = _string_field(reader, METADATA_KEY)
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return {}
    if not isinstance(meta, dict):
        return {}
    # keep only well-typed fields: this metadata is a hint, never a reason to fail or mislabel
    meta = {k: v for k, v in meta.items() if isinstance(v, dict if k == "settings" else str)}
    if meta.get("site") == "hook_resid_pre":  # written from block inputs; read back as outputs
        meta.setdefault("settings", {})["exported_from_site"] = "hook_resid_pre"
    return meta


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.data):
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading and writing GGUF control vectors needs the gguf package: "
                          "pip install gguf") from None
    return gguf
