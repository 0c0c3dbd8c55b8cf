"""Names for the parts of a model that ablation and patching act on.

    "L3H5"        head 5 of block 3 (its slice of attn.hook_z, the output projection's input)
    "L3.attn"     block 3's whole attention output (hook_attn_out)
    "L3.mlp"      block 3's whole MLP output (hook_mlp_out)
    "L3N120"      neuron 120 of block 3's MLP (mlp.hook_post)
    "embed"       the token embeddings (hook_embed)
    any site name, e.g. "blocks.3.hook_resid_pre" (the whole activation)

Layers may be negative (-1 is the last block).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from interplab.models.handle import LoadedModel
from interplab.sites import Site, check_layer

_PATTERNS = (
    (re.compile(r"^L(-?\d+)H(\d+)$"), "attn.hook_z"),
    (re.compile(r"^L(-?\d+)N(\d+)$"), "mlp.hook_post"),
    (re.compile(r"^L(-?\d+)\.attn$"), "hook_attn_out"),
    (re.compile(r"^L(-?\d+)\.mlp$"), "hook_mlp_out"),
)


@dataclass(frozen=True)
class Component:
    """A part of the model: a site, and a head or neuron index along its first feature axis."""

    site: Site
    """Canonical site (non-negative layer)."""
    index: int | None = None
    """Head (attn.hook_z) or neuron (mlp.hook_post); None: the whole activation."""

    @property
    def label(self) -> str:
        """Short name: L3H5, L3N120, L3.attn, L3.mlp, embed, or the site name."""
        layer, kind = self.site.layer, self.site.kind
        if kind == "attn.hook_z" and self.index is not None:
            return f"L{layer}H{self.index}"
        if kind == "mlp.hook_post" and self.index is not None:
            return f"L{layer}N{self.index}"
        short = {"hook_attn_out": "attn", "hook_mlp_out": "mlp"}.get(kind)
        if short:
            return f"L{layer}.{short}"
        return "embed" if kind == "hook_embed" else self.site.name

    def __str__(self) -> str:
        return self.label


def parse_component(model: LoadedModel, spec: "str | Component") -> Component:
    """A Component from its short name or a site name, checked against the model."""
    if isinstance(spec, Component):
        return _checked(model, spec.site.name, spec.index, spec.label)
    if not isinstance(spec, str):
        raise TypeError(f"a component is a name like 'L3H5', 'L3.mlp' or a site name, got {spec!r}")
    if spec == "embed":
        return Component(model.site("hook_embed"))
    for pattern, kind in _PATTERNS:
        match = pattern.match(spec)
        if match:
            index = int(match.group(2)) if match.lastindex == 2 else None
            return _checked(model, f"blocks.{match.group(1)}.{kind}", index, spec)
    try:
        return Component(model.site(spec))
    except ValueError as err:
        raise ValueError(f"component {spec!r} is not understood: use L<layer>H<head>, L<layer>N<neuron>, "
                         f"L<layer>.attn, L<layer>.mlp, embed, or a site name ({err})") from None


def _checked(model: LoadedModel, site_name: str, index: int | None, spec: str) -> Component:
    site = model.site(site_name)
    if index is not None:
        size, unit = (model.n_heads, "heads") if site.kind == "attn.hook_z" else (model.d_mlp, "neurons")
        if site.kind not in ("attn.hook_z", "mlp.hook_post"):
            raise ValueError(f"component {spec!r}: an index only applies to heads (attn.hook_z) or neurons "
                             "(mlp.hook_post)")
        if not 0 <= index < size:
            kind = "head" if unit == "heads" else "neuron"
            raise ValueError(f"{kind} index {index} in {spec!r} is out of range: {model.model_id} has "
                             f"{size} {unit} per layer (valid 0..{size - 1})")
    return Component(site, index)


def parse_components(model: LoadedModel, specs: "Iterable[str | Component] | str") -> list[Component]:
    if isinstance(specs, (str, Component)):
        specs = [specs]
    components = [parse_component(model, spec) for spec in specs]
    if not components:
        raise ValueError("no components given: name at least one, e.g. 'L3H5' or 'L3.mlp'")
    return components


def parse_layers(model: LoadedModel, layers) -> list[int]:
    """None: every layer; an int, a list of ints, or a text like "0-5,9" (negative: from the end)."""
    n = model.n_layers
    if layers is None or layers == "all":
        return list(range(n))
    if isinstance(layers, str):
        layers = _layer_text(layers)
    if isinstance(layers, int):
        layers = [layers]
    out = [check_layer(layer, n, type(model.hf).__name__) for layer in layers]
    if not out:
        raise ValueError("no layers selected")
    return list(dict.fromkeys(out))


def _layer_text(text: str) -> list[int]:
    layers = []
    for part in text.split(","):
        part = part.strip()
        match = re.match(r"^(-?\d+)\s*-\s*(-?\d+)$", part)
        try:
            layers += list(range(int(match.group(1)), int(match.group(2)) + 1)) if match else [int(part)]
        except ValueError:
            raise ValueError(f"layers {text!r} are not understood: write e.g. '0-5,9' or 'all'") from None
    return layers
