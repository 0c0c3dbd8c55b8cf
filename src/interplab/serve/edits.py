"""A request's `steering` list -> the library's intervention objects, validated before any work.

Vector edits become `add_vector` interventions at `blocks.L.<site>` (the site the vector was made
for); SAE edits become `steer_feature` / `clamp_feature` / `ablate_feature` at the SAE's site;
`logit_bias` becomes a `FeatureLogitBias`, applied to the row's logits at sampling time. Every
intervention is validated by the library against its site and the model, and any problem is
an `APIError` whose `param` points at the edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interplab.interventions import add_vector
from interplab.models.handle import LoadedModel
from interplab.positions import Positions
from interplab.serve.registry import SAERegistry, VectorRegistry
from interplab.serve.rows import _is_plain_add
from interplab.serve.schemas import APIError, Edit, FeatureEdit, VectorEdit
from interplab.steering.vector import SteeringVector, resolve_positions


def build_edits(model: LoadedModel, edits: Sequence[Edit], vectors: VectorRegistry, saes: SAERegistry
                ) -> tuple[dict, list]:
    """({Site: [interventions]}, [logit biases]) for one row."""
    by_site: dict = {}
    biases: list = []
    for i, edit in enumerate(edits):
        param = f"steering[{i}]"
        try:
            if isinstance(edit, VectorEdit):
                pairs = _vector_edit(model, edit, vectors, param)
            elif edit.mode == "logit_bias":
                biases.append(_logit_bias(model, edit, saes, param))
                pairs = []
            else:
                pairs = [_feature_edit(model, edit, saes, param)]
            for site_name, intervention in pairs:
                site = model.site(site_name)
                bound = intervention.bind(site, model)  # checked against the site and model
                # plain additions stay values (the batch adds them for all rows at once)
                by_site.setdefault(site, []).append(intervention if _is_plain_add(intervention) else bound)
        except APIError:
            raise
        except (ValueError, TypeError) as error:  # the library's own checks, with its message
            raise APIError(400, f"{param}: {error}", param=param, code="invalid_steering") from None
    return by_site, biases


def edit_positions(model: LoadedModel, spec) -> Positions:
    if isinstance(spec, dict):
        return Positions.from_(int(spec["from"]))
    return resolve_positions(model, spec)


def _vector_edit(model, edit: VectorEdit, vectors: VectorRegistry, param: str) -> list[tuple[str, object]]:
    if isinstance(edit.vector, str):
        from interplab.serve.registry import check_fits

        vector = vectors.get(edit.vector, param=f"{param}.vector")
        check_fits(vector, model, edit.vector)
        name = edit.vector
    else:
        vector = _raw_vector(model, edit, param)
        name = "raw"
    if vector.position_aligned:
        raise APIError(400, f"vector {name!r} is position-aligned (ActAdd); the server steers with plain "
                            "vectors", param=f"{param}.vector", code="invalid_steering")
    layers = vector.layers if edit.layers is None else edit.layers
    positions = edit_positions(model, edit.positions)
    out = []
    for layer in layers:
        if not -model.n_layers <= layer < model.n_layers:
            raise APIError(400, f"layer {layer} is out of range: this model has {model.n_layers} blocks "
                                f"(valid 0..{model.n_layers - 1})", param=f"{param}.layers", code="invalid_layer")
        layer %= model.n_layers
        if layer not in vector.directions:
            raise APIError(400, f"vector {name!r} has no direction for layer {layer}; it has layers "
                                f"{vector.layers}", param=f"{param}.layers", code="invalid_layer")
        out.append((f"blocks.{layer}.{vector.site}",
                    add_vector(vector[layer], scale=edit.scale, positions=positions)))
    return out


def _raw_vector(model, edit: VectorEdit, param: str) -> SteeringVector:
    if len(edit.vector) != model.d_model:
        raise APIError(400, f"the vector has width {len(edit.vector)} but this model ({model.model_id}) has "
                            f"hidden_size {model.d_model}", param=f"{param}.vector", code="wrong_width")
    if not edit.layers:
        raise APIError(400, "a vector given as floats needs \"layers\"", param=f"{param}.layers",
                       code="invalid_layer")
    direction = torch.tensor(edit.vector, dtype=torch.float32)
    layers = {layer % model.n_layers for layer in edit.layers if -model.n_layers <= layer < model.n_layers}
    return SteeringVector({layer: direction for layer in layers} or {0: direction})


def _feature_edit(model, edit: FeatureEdit, saes: SAERegistry, param: str) -> tuple[str, object]:
    from interplab.sae.steer import ablate_feature, clamp_feature, steer_feature

    entry = saes.get(edit.sae, param=f"{param}.sae")
    saes.check_feature(entry, edit.feature, param=f"{param}.feature")
    positions = edit_positions(model, edit.positions)
    if edit.mode == "add":
        return entry.site, steer_feature(entry.sae, edit.feature, scale=edit.value, positions=positions)
    if edit.mode == "clamp":
        return entry.site, clamp_feature(entry.sae, edit.feature, edit.value, positions=positions)
    return entry.site, ablate_feature(entry.sae, edit.feature, positions=positions)


def _logit_bias(model, edit: FeatureEdit, saes: SAERegistry, param: str):
    from interplab.sae.steer import FeatureLogitBias

    entry = saes.get(edit.sae, param=f"{param}.sae")
    saes.check_feature(entry, edit.feature, param=f"{param}.feature")
    return FeatureLogitBias(model, entry.sae, edit.feature, scale=edit.value, site=entry.site)
