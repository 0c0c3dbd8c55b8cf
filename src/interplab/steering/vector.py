"""`SteeringVector`: one direction per layer, with the metadata needed to reuse it.

A steering vector is a value (repeng's lesson): `v + w`, `v - w`, `2.5 * v`, `-v`,
`v / n` make new vectors; nothing is attached to a model until `apply()` is used:

    with vec.apply(model, layers=[12], scale=4.0, positions="caa"):
        interplab.generate(model, "The weather in California is")

`apply()` returns interplab's `InterventionHandle`, so the handle form works too
(`h = vec.apply(...); ...; h.remove()`).

Steering adds `scale * v_L` to the residual stream at layer L (Turner et al. 2023,
"Activation Addition"; Panickssery et al. 2024, "Steering Llama 2 via Contrastive
Activation Addition"). A position-aligned vector (ActAdd: shape (n_pos, d_model))
adds its row p at absolute position p.

A saved vector is a folder anyone can read without interplab:
`config.json` (with "format_version") and `vectors.safetensors` holding one float32
tensor per layer named like the site, e.g. "blocks.12.hook_resid_post".
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.devices import Copies
from interplab.errors import ArtifactError, UserInputError
from interplab.files import (atomic_folder, check_digest, check_replaceable, config_field, load_tensors,
                             read_json_object, save_tensors, tensors_digest, write_json)
from interplab.interventions import (Intervention, InterventionHandle, add_vector, as_vector,
                                     check_number, intervene)
from interplab.models.handle import LoadedModel, as_loaded
from interplab.positions import Positions, as_positions
from interplab.sites import check_layer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "vectors.safetensors"
STEERABLE_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
POSITION_CHOICES = ("all", "caa", "caa_tail", "actadd")


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Directions keyed by block index, plus where and how they were made."""

    directions: Mapping[int, Tensor]
    """Block index (>= 0) -> float32 tensor (d_model,), or (n_pos, d_model) for a
    position-aligned ActAdd vector."""
    site: str = "hook_resid_post"
    """Site kind inside each block where the vector is read and added."""
    model_id: str = ""
    """The model it was made on (alias, folder or Hub id)."""
    model_type: str = ""
    """HF `model_type` of that model (written as llama.cpp's `controlvector.model_hint`)."""
    method: str = ""
    """How it was made: mean_diff, pca_diff, pca_center, logistic, actadd, gguf, combination."""
    dataset_fingerprint: str = ""
    """sha256 prefix of the contrast pairs it was made from."""
    settings: Mapping = field(default_factory=dict)
    """Creation settings (JSON-serialisable): layers, read position, batch size, source file..."""

    def __post_init__(self) -> None:
        if self.site not in STEERABLE_SITES:
            raise ValueError(f"site {self.site!r} cannot hold a steering vector; use one of "
                             f"{', '.join(STEERABLE_SITES)}")
        if not self.directions:
            raise ValueError("a steering vector needs at least one layer")
        cleaned = {}
        for layer, direction in self.directions.items():
            cleaned[_check_layer_key(layer)] = _check_direction(direction, layer)
        widths = {d.shape[-1] for d in cleaned.values()}
        if len(widths) != 1:
            raise ValueError(f"every layer's direction must have the same width; got widths {sorted(widths)}")
        object.__setattr__(self, "directions", dict(sorted(cleaned.items())))
        object.__setattr__(self, "settings", dict(self.settings))

    # --- shape ------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[-1])

    @property
    def position_aligned(self) -> bool:
        """True for ActAdd vectors: one row per absolute position from the start of the prompt."""
        return next(iter(self.directions.values())).dim() == 2

    def __getitem__(self, layer: int) -> Tensor:
        if layer not in self.directions:
            raise KeyError(f"this vector has no direction for layer {layer}; it has layers {self.layers}")
        return self.directions[layer]

    def __len__(self) -> int:
        return len(self.directions)

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: {v:.3g}" for k, v in self.norms().items())
        aligned = f", aligned over {next(iter(self.directions.values())).shape[0]} positions" if self.position_aligned else ""
        return (f"SteeringVector(site={self.site}, d_model={self.d_model}, method={self.method!r}, "
                f"model={self.model_id!r}{aligned}, norms={{{norms}}})")

    # --- arithmetic -------------------------------------------------------------------------
    def __add__(self, other: "SteeringVector") -> "SteeringVector":
        return self._combine(other, 1.0)

    def __sub__(self, other: "SteeringVector") -> "SteeringVector":
        return self._combine(other, -1.0)

    def __neg__(self) -> "SteeringVector":
        return self * -1.0

    def __mul__(self, factor: float) -> "SteeringVector":
        factor = _check_number(factor, "a steering vector can only be multiplied by a number")
        return self._map(lambda d: d * factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> "SteeringVector":
        divisor = _check_number(divisor, "a steering vector can only be divided by a number")
        if divisor == 0:
            raise ZeroDivisionError("cannot divide a steering vector by zero")
        return self._map(lambda d: d / divisor)

    def _map(self, fn) -> "SteeringVector":
        return replace(self, directions={k: fn(v) for k, v in self.directions.items()})

    def _combine(self, other: "SteeringVector", sign: float) -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_compatible(other)
        layers = sorted(set(self.directions) | set(other.directions))
        zero = torch.zeros_like(next(iter(self.directions.values())))
        directions = {k: self.directions.get(k, zero) + sign * other.directions.get(k, zero) for k in layers}
        return SteeringVector(
            directions, site=self.site,
            model_id=self.model_id if self.model_id == other.model_id else "",
            model_type=self.model_type if self.model_type == other.model_type else "",
            method="combination", dataset_fingerprint="",
            settings={"parts": [_summary(self), _summary(other)], "signs": [1.0, sign]},
        )

    def _check_compatible(self, other: "SteeringVector") -> None:
        if other.site != self.site:
            raise ValueError(f"cannot combine vectors at different sites ({self.site} and {other.site})")
        mine, theirs = next(iter(self.directions.values())).shape, next(iter(other.directions.values())).shape
        if mine != theirs:
            raise ValueError(f"cannot combine vectors of per-layer shape {tuple(mine)} and {tuple(theirs)} "
                             "(different models, or an ActAdd vector with a plain one)")

    # --- geometry ---------------------------------------------------------------------------
    def norms(self) -> dict[int, float]:
        """Euclidean norm of each layer's direction (all positions together for ActAdd vectors)."""
        return {k: float(v.norm()) for k, v in self.directions.items()}

    def normalized(self) -> "SteeringVector":
        """Each layer's direction scaled to unit norm (a zero direction stays zero)."""
        return self._map(lambda d: d / d.norm() if float(d.norm()) > 0 else d)

    def cosine_similarity(self, other: "SteeringVector") -> dict[int, float]:
        """cos(v_L, w_L) for every layer both vectors have."""
        self._check_compatible(other)
        common = [k for k in self.directions if k in other.directions]
        if not common:
            raise ValueError(f"the vectors share no layer (layers {self.layers} and {other.layers})")
        return {k: _cosine(self.directions[k], other.directions[k]) for k in common}

    def select(self, layers: Iterable[int]) -> "SteeringVector":
        """A vector with only the given layers."""
        chosen = [int(k) for k in layers]
        missing = [k for k in chosen if k not in self.directions]
        if missing:
            raise ValueError(f"layers {missing} are not in this vector (it has {self.layers})")
        return replace(self, directions={k: self.directions[k] for k in chosen})

    # --- applying ---------------------------------------------------------------------------
    def apply(self, model, *, layers: Iterable[int] | int | None = None, scale: float = 1.0,
              positions=None, norm_preserving: bool = False) -> InterventionHandle:
        """Add `scale * v_L` at `blocks.L.<site>` for each chosen layer; returns the handle
        (a context manager; or call `.remove()`).

        positions: "all" (default; every token), "caa" (the paper's rule: from the first token
        after the chat template's assistant header on, then every generated token; Panickssery
        et al. 2024), "caa_tail" (from the end of the user's message on, template tail
        included; see `caa_positions`), "actadd" (ActAdd vectors: row p at position p;
        Turner et al. 2023), or any foundation `Positions` value / shorthand.
        norm_preserving: rescale each steered residual to the norm it had before.
        """
        model = as_loaded(model)
        self.check_model(model)
        chosen = self._chosen_layers(model, layers)
        scale = _check_number(scale, f"scale must be a number, got {scale!r}")
        interventions = {
            f"blocks.{layer}.{self.site}": self._intervention(model, layer, scale, positions, norm_preserving)
            for layer in chosen
        }
        return intervene(model, interventions)

    def check_model(self, model) -> None:
        """Raise if the widths differ; warn if the vector was made on another model."""
        model = as_loaded(model)
        if self.d_model != model.d_model:
            made_on = f" (made on {self.model_id})" if self.model_id else ""
            raise ValueError(f"vector has d_model={self.d_model}{made_on}; this model "
                             f"({model.model_id}) has hidden_size={model.d_model}. A steering vector "
                             "only fits models of the width it was made on.")
        if self.model_id and model.model_id and self.model_id != model.model_id:
            warnings.warn(f"this vector was made on {self.model_id!r} and is applied to "
                          f"{model.model_id!r}; the widths match, but directions rarely transfer "
                          "between models", UserWarning, stacklevel=3)

    def _chosen_layers(self, model: LoadedModel, layers) -> list[int]:
        too_deep = [k for k in self.directions if k >= model.n_layers]
        if too_deep:
            raise ValueError(f"this vector has layers {too_deep} but {type(model.hf).__name__} has "
                             f"{model.n_layers} blocks (valid 0..{model.n_layers - 1}); it was made "
                             "for a deeper model")
        if layers is None:
            return self.layers
        wanted = [layers] if isinstance(layers, int) else list(layers)
        chosen = []
        for layer in wanted:
            layer = check_layer(layer, model.n_layers, type(model.hf).__name__)
            if layer not in self.directions:
                raise ValueError(f"layer {layer} is not in this vector; it has layers {self.layers}")
            chosen.append(layer)
        if not chosen:
            raise ValueError("no layers chosen: pass layers=None for all of the vector's layers")
        return chosen

    def _intervention(self, model, layer, scale, positions, norm_preserving) -> Intervention:
        direction = self.directions[layer]
        if self.position_aligned:
            if positions not in (None, "actadd"):
                raise ValueError("an ActAdd (position-aligned) vector adds row p at position p; "
                                 "use positions=None or 'actadd'")
            return AddAligned(direction, scale, norm_preserving)
        return add_vector(direction, scale=scale, positions=resolve_positions(model, positions),
                          norm_preserving=norm_preserving)

    # --- files ------------------------------------------------------------------------------
    def config(self) -> dict:
        """The JSON config written beside the tensors."""
        return {
            "format_version": FORMAT_VERSION, "kind": "interplab.steering_vector",
            "model_id": self.model_id, "model_type": self.model_type, "d_model": self.d_model,
            "site": self.site, "layers": self.layers, "position_aligned": self.position_aligned,
            "method": self.method, "dataset_fingerprint": self.dataset_fingerprint,
            "settings": self.settings,
            "tensors": {str(k): tensor_name(k, self.site) for k in self.layers},
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `vectors.safetensors` into `folder`, swapped in as a whole: a
        failure leaves the previous vector (or nothing), never new tensors under an old config."""
        folder = Path(folder)
        check_replaceable(folder, _is_vector_folder, "steering vector folder")
        tensors = {tensor_name(k, self.site): v.contiguous() for k, v in self.directions.items()}
        config = {**self.config(), "tensors_digest": tensors_digest(tensors)}
        with atomic_folder(folder) as tmp:
            save_tensors(tmp / TENSORS_FILE, tensors, metadata={"format": "pt"})
            write_json(tmp / CONFIG_FILE, config)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SteeringVector":
        """Read a folder written by `save()`."""
        return load_vector(folder)

    def to_gguf(self, path: str | os.PathLike, *, model_hint: str | None = None) -> Path:
        """Export as a llama.cpp / repeng control vector (see `interplab.steering.gguf_io`)."""
        from interplab.steering.gguf_io import export_gguf

        return export_gguf(self, path, model_hint=model_hint)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "SteeringVector":
        from interplab.steering.gguf_io import import_gguf

        return import_gguf(path)


# --- position-aligned addition (ActAdd) -------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AddAligned(Intervention):
    """x_p <- x_p + scale * rows[p] for absolute positions p < n_pos (Turner et al. 2023)."""

    rows: Float[Tensor, "n_pos d_model"]
    scale: float = 1.0
    norm_preserving: bool = False

    def _check(self):
        object.__setattr__(self, "rows", as_vector(self.rows, "ActAdd rows"))
        object.__setattr__(self, "scale", check_number(self.scale, "scale"))

    def _bind(self, site, model):
        if self.rows.dim() != 2 or self.rows.shape[-1] != model.d_model:
            raise UserInputError(f"ActAdd rows have shape {tuple(self.rows.shape)}; expected "
                                 f"(n_pos, {model.d_model}) for {model.model_id}")
        rows, scale, norm_preserving, copies = self.rows, self.scale, self.norm_preserving, Copies()

        def add(act, ctx):
            positions = ctx.positions(act)  # (batch, seq) absolute, -1 = padding
            n_pos = rows.shape[0]
            inside = (positions >= 0) & (positions < n_pos)
            cast = copies.like(rows, act)
            added = cast[positions.clamp(0, n_pos - 1)] * inside[..., None]  # (batch, seq, d_model)
            new = act + scale * added
            if norm_preserving:
                rescaled = new * (act.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                new = torch.where(inside[..., None], rescaled, act)
            return new

        return add


# --- positions --------------------------------------------------------------------------------

CAA_RULES = ("caa", "caa_tail")
"""Where CAA steering starts (see `caa_positions`)."""


def resolve_positions(model, positions) -> Positions:
    """Turn "all" / "caa" / "caa_tail" / a Positions shorthand into `Positions` for a plain vector."""
    if positions is None or positions == "all":
        return Positions.all()
    if positions in CAA_RULES:
        return caa_positions(as_loaded(model), positions)
    if positions == "actadd":
        raise ValueError("positions='actadd' needs a position-aligned vector (from actadd pairs); for a "
                         "plain vector use Positions.first(n) to add it at the first n positions")
    return as_positions(positions)


def caa_positions(model: LoadedModel, rule: str = "caa", chat: bool | None = None) -> Positions:
    """Where CAA steering starts in a chat-formatted prompt, found in each row's own tokens.

    "caa" (the default; the paper's rule): from the first token after the chat template's
    assistant header onward, as CAA's code does (Panickssery et al. 2024 steer every position
    after the end of the instruction, "[/INST]"): in an A/B prompt that is the "(" before the
    answer letter, then every generated token. It is the default because it is the published
    method, and because it steers only tokens the vector was read at (answer tokens), not the
    template. "caa_tail": from the first token after the user's message, i.e. the template's
    closing and assistant header too (interplab's rule before 0.2).

    Both are anchored on the last occurrence of the header's tokens in each prompt, so text
    appended after the template (an answer prefix such as "(") does not move the start.
    Without a chat template there is no header: both steer from the last prompt token on.
    """
    if rule not in CAA_RULES:
        raise ValueError(f"rule must be one of {', '.join(CAA_RULES)}, got {rule!r}")
    header = chat_header_ids(model, chat)
    if header is None:
        return Positions.from_(-1)
    return Positions.after(header, 0 if rule == "caa" else -len(header))


def chat_header_ids(model: LoadedModel, chat: bool | None = None) -> tuple[int, ...] | None:
    """Token ids the chat template puts between the user's message and the assistant's answer
    (its closing and the assistant header), as tokenised in context; None without a template."""
    from interplab.generation import format_prompt, has_chat_template

    use_chat = has_chat_template(model) if chat is None else chat
    if not use_chat:
        return None
    tokenizer = model.require_tokenizer()
    marker = "Is it hot?"
    full = format_prompt(model, marker, chat=True)
    head = full[: full.index(marker) + len(marker)]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    header = tuple(full_ids[n_head:])
    if not header:
        raise ValueError(f"the chat template of {model.model_id} adds nothing after the user's message; "
                         "there is no assistant header to anchor 'caa' positions on")
    return header


# --- loading ----------------------------------------------------------------------------------

def tensor_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.{site}"


def load_vector(folder: str | os.PathLike) -> SteeringVector:
    """Read a vector folder (config.json + vectors.safetensors), checking it first."""
    folder = Path(folder)
    config = _read_config(folder)
    config_path, tensors_path = folder / CONFIG_FILE, folder / TENSORS_FILE
    if not tensors_path.exists():
        raise ArtifactError(f"{folder} has config.json but no {TENSORS_FILE}")
    tensors = load_tensors(tensors_path, "steering vector file")
    check_digest(config.get("tensors_digest"), tensors_digest(tensors), config_path, tensors_path)
    directions = {}
    for layer, name in config["tensors"].items():
        if not (isinstance(layer, str) and layer.isdigit() and isinstance(name, str)):
            raise ArtifactError(f"{config_path}: field 'tensors' must map layer numbers to tensor names, "
                                f"got {layer!r}: {name!r}")
        if name not in tensors:
            raise ArtifactError(f"{tensors_path} lacks tensor {name!r} listed in config.json")
        directions[int(layer)] = tensors[name]
    vector = SteeringVector(
        directions, site=config["site"], model_id=config["model_id"], model_type=config["model_type"],
        method=config["method"], dataset_fingerprint=config["dataset_fingerprint"], settings=config["settings"],
    )
    if vector.d_model != config["d_model"]:
        raise ArtifactError(f"{folder}: config says d_model={config['d_model']} but the tensors have "
                            f"width {vector.d_model}")
    return vector


_CONFIG_FIELDS = {"site": (str, ...), "d_model": (int, ...), "tensors": (dict, ...), "model_id": (str, ""),
                  "model_type": (str, ""), "method": (str, ""), "dataset_fingerprint": (str, ""),
                  "settings": (dict, {}), "tensors_digest": (str, None)}
"""config.json fields read back: expected type and default (... = required)."""


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ArtifactError(f"no steering vector folder at {folder}")
    if not path.exists():
        raise ArtifactError(f"{folder} is not a steering vector folder: it has no {CONFIG_FILE}")
    raw = read_json_object(path, "steering vector config")
    version = raw.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{path} has no integer 'format_version'; it was not written by interplab")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version}; this interplab reads up to "
                            f"{FORMAT_VERSION}: upgrade interplab")
    config = {key: config_field(raw, key, kind, path, default=default, what="steering vector config")
              for key, (kind, default) in _CONFIG_FIELDS.items()}
    return config


def _is_vector_folder(folder: Path) -> bool:
    try:
        return read_json_object(folder / CONFIG_FILE).get("kind") == "interplab.steering_vector"
    except ArtifactError:
        return False


# --- small helpers ----------------------------------------------------------------------------

def _check_layer_key(layer) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer keys must be non-negative ints, got {layer!r}")
    return layer


def _check_direction(direction, layer) -> Tensor:
    if not isinstance(direction, Tensor):
        direction = torch.as_tensor(direction)
    if direction.is_complex():
        raise UserInputError(f"the direction for layer {layer} is complex ({direction.dtype}); a steering "
                             "vector is real: pass its real part (.real) or its magnitude (.abs()) explicitly")
    if direction.dim() not in (1, 2) or direction.shape[-1] == 0:
        raise ValueError(f"the direction for layer {layer} has shape {tuple(direction.shape)}; "
                         "expected (d_model,) or (n_pos, d_model)")
    direction = direction.detach().to("cpu", torch.float32)
    if not torch.isfinite(direction).all():
        raise ValueError(f"the direction for layer {layer} contains NaN or inf")
    return direction


def _check_number(value, message: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, Tensor) and value.numel() == 1):
        raise TypeError(message)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _summary(vector: SteeringVector) -> dict:
    return {"method": vector.method, "model_id": vector.model_id,
            "dataset_fingerprint": vector.dataset_fingerprint}
