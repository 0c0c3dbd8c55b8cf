"""What the server can steer with: named steering vectors, SAEs and their feature indexes.

Vectors live in a folder (one vector folder per name, the library's own format) or, without
`--vectors`, in memory. Names use a safe alphabet, so nothing is ever written outside the
registry folder. Every vector is checked against the model's width before it is kept.
"""

from __future__ import annotations

import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from interplab.models.handle import LoadedModel
from interplab.serve.schemas import APIError
from interplab.steering.vector import SteeringVector, load_vector

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str = "vector") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise APIError(400, f"{what} name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                            "starting with a letter or digit", param="name", code="invalid_name")
    return name


def check_fits(vector: SteeringVector, model: LoadedModel, name: str) -> None:
    """The vector's width and layers against the model, as a 400 that names both widths."""
    if vector.d_model != model.d_model:
        made_on = f" (made on {vector.model_id})" if vector.model_id else ""
        raise APIError(400, f"vector {name!r} has width {vector.d_model}{made_on} but this model "
                            f"({model.model_id}) has hidden_size {model.d_model}", param="vector",
                       code="wrong_width")
    too_deep = [k for k in vector.layers if k >= model.n_layers]
    if too_deep:
        raise APIError(400, f"vector {name!r} has layers {too_deep} but this model has {model.n_layers} "
                            f"blocks (valid 0..{model.n_layers - 1})", param="vector", code="wrong_layers")


@dataclass
class VectorRegistry:
    model: LoadedModel
    folder: Path | None = None
    _vectors: dict[str, SteeringVector] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.folder is None:
            return
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if NAME_PATTERN.match(path.name):
                self._vectors[path.name] = load_vector(path)

    def names(self) -> list[str]:
        return sorted(self._vectors)

    def describe(self) -> list[dict]:
        return [{"name": name, "layers": v.layers, "d_model": v.d_model, "site": v.site, "method": v.method,
                 "model_id": v.model_id, "fits": v.d_model == self.model.d_model}
                for name, v in sorted(self._vectors.items())]

    def get(self, name: str, param: str = "vector") -> SteeringVector:
        if name not in self._vectors:
            known = ", ".join(self.names()) or "none (upload one to /api/vectors)"
            raise APIError(404, f"unknown steering vector {name!r}; known vectors: {known}", param=param,
                           code="vector_not_found")
        return self._vectors[name]

    def add(self, name: str, vector: SteeringVector, *, overwrite: bool = False) -> None:
        check_name(name)
        check_fits(vector, self.model, name)
        with self._lock:
            if name in self._vectors and not overwrite:
                raise APIError(409, f"a vector named {name!r} exists; delete it first or pass overwrite",
                               param="name", code="vector_exists")
            if self.folder is not None:
                vector.save(self.folder / name)  # swapped in whole
            self._vectors[name] = vector

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self.get(name, param="name")
            if self.folder is not None:
                shutil.rmtree(self.folder / name)
            del self._vectors[name]


@dataclass
class SAEEntry:
    name: str
    sae: object
    site: str
    index_path: Path | None = None


@dataclass
class SAERegistry:
    entries: dict[str, SAEEntry] = field(default_factory=dict)

    def get(self, name: str, param: str = "sae") -> SAEEntry:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none (start the server with --sae NAME=FOLDER)"
            raise APIError(404, f"unknown SAE {name!r}; known SAEs: {known}", param=param, code="sae_not_found")
        return self.entries[name]

    def check_feature(self, entry: SAEEntry, feature: int, param: str = "feature") -> None:
        d_sae = entry.sae.cfg.d_sae
        if not 0 <= feature < d_sae:
            raise APIError(400, f"feature {feature} is out of range: SAE {entry.name!r} has {d_sae} latents "
                                f"(valid 0..{d_sae - 1})", param=param, code="feature_out_of_range")

    def describe(self) -> list[dict]:
        return [{"name": e.name, "site": e.site, "d_sae": e.sae.cfg.d_sae, "family": e.sae.cfg.family,
                 "has_index": e.index_path is not None} for e in self.entries.values()]

    def index(self, name: str):
        """A fresh read-only connection to the SAE's feature index (SQLite connections are per thread)."""
        from interplab.sae.features import FeatureIndex

        entry = self.get(name)
        if entry.index_path is None:
            raise APIError(404, f"SAE {name!r} has no feature index; start the server with --features "
                                f"{name}=INDEX.sqlite", param="sae", code="index_not_found")
        return FeatureIndex(entry.index_path, sae=entry.sae)


def load_saes(model: LoadedModel, specs: dict[str, str], indexes: dict[str, str]) -> SAERegistry:
    """SAEs from --sae NAME=FOLDER and feature indexes from --features [NAME=]DB, checked against the model."""
    from interplab.sae.downstream import resolve_sae_site
    from interplab.sae.formats import load_sae

    registry = SAERegistry()
    for name, folder in specs.items():
        check_name(name, "SAE")
        sae = load_sae(folder).to(model.device)
        site = resolve_sae_site(model, sae).name
        registry.entries[name] = SAEEntry(name, sae, site)
    for name, path in indexes.items():
        if name not in registry.entries:
            raise ValueError(f"--features {name}={path}: no SAE named {name!r} (give --sae {name}=FOLDER)")
        if not Path(path).is_file():
            raise ValueError(f"--features {name}={path}: no such file")
        from interplab.sae.features import FeatureIndex

        FeatureIndex(path, sae=registry.entries[name].sae).close()  # refuses an index built from another SAE
        registry.entries[name].index_path = Path(path)
    return registry


@dataclass
class TranscoderRegistry:
    """Named transcoder sets (folders written by `interplab sae transcoders`) for attribution graphs."""

    sets: dict[str, dict] = field(default_factory=dict)
    """name -> {layer: Transcoder}."""
    index_paths: dict[str, dict[int, Path]] = field(default_factory=dict)
    """name -> {layer: the layer's feature index}, for the layers that have one."""

    def get(self, name: str | None, param: str = "transcoders") -> tuple[str, dict]:
        """The set called `name` (None: the only one), or a 404 that lists the known sets."""
        if name is None and len(self.sets) == 1:
            name = next(iter(self.sets))
        if name not in self.sets:
            known = ", ".join(sorted(self.sets)) or "none (start the server with --transcoders NAME=FOLDER)"
            what = "name a transcoder set" if name is None else f"unknown transcoder set {name!r}"
            raise APIError(404, f"{what}; known sets: {known}", param=param, code="transcoders_not_found")
        return name, self.sets[name]

    def transcoder(self, name: str, layer: int):
        name, layers = self.get(name)
        if layer not in layers:
            raise APIError(404, f"transcoder set {name!r} has no transcoder for layer {layer}; it has layers "
                                f"{sorted(layers)}", param="layer", code="layer_not_found")
        return layers[layer]

    def index(self, name: str, layer: int):
        """A fresh read-only connection to the layer's feature index (checked against its transcoder),
        or None when the set has no index for that layer."""
        from interplab.sae.features import FeatureIndex

        transcoder = self.transcoder(name, layer)
        name, _ = self.get(name)
        path = self.index_paths.get(name, {}).get(layer)
        return None if path is None else FeatureIndex(path, sae=transcoder)

    def describe(self) -> list[dict]:
        return [{"name": name, "layers": sorted(layers), "indexed_layers": sorted(self.index_paths.get(name, {})),
                 "d_sae": {str(L): tc.cfg.d_sae for L, tc in sorted(layers.items())},
                 "family": sorted({tc.cfg.family for tc in layers.values()}),
                 "skip": any(tc.cfg.skip for tc in layers.values()),
                 "model_id": next(iter(layers.values())).cfg.model_id}
                for name, layers in sorted(self.sets.items())]


def load_transcoder_sets(model: LoadedModel, specs: dict[str, str]) -> TranscoderRegistry:
    """Transcoder sets from --transcoders NAME=FOLDER, checked against the model's width and depth,
    with the feature index of each layer that has one in the folder (features-<L>.db, written by
    `interplab sae features FOLDER --layers L`; one built from other transcoders is refused)."""
    from interplab.sae.features import FeatureIndex, transcoder_index_path
    from interplab.sae.transcoder import load_transcoders

    registry = TranscoderRegistry()
    for name, folder in specs.items():
        check_name(name, "transcoder set")
        layers = load_transcoders(folder)
        if not layers:
            raise ValueError(f"--transcoders {name}={folder}: the folder lists no transcoder")
        for layer, tc in layers.items():
            if not 0 <= layer < model.n_layers or tc.cfg.d_in != model.d_model or tc.cfg.d_out != model.d_model:
                raise ValueError(f"--transcoders {name}={folder}: the transcoder for layer {layer} reads "
                                 f"d_in={tc.cfg.d_in}, writes d_out={tc.cfg.d_out}, but {model.model_id} has "
                                 f"{model.n_layers} blocks of width {model.d_model}")
        registry.sets[name] = layers  # kept where `interplab sae graph` keeps them: interplab.graph works on CPU copies
        registry.index_paths[name] = {}
        for layer, tc in layers.items():
            path = transcoder_index_path(folder, layer)
            if path.is_file():
                FeatureIndex(path, sae=tc).close()  # refuses an index left from other transcoders
                registry.index_paths[name][layer] = path
    return registry
