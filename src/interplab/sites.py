"""Activation addresses in the TransformerLens vocabulary.

    hook_embed                       token embeddings (output of the embedding module)
    blocks.{i}.hook_resid_pre        block i's input
    blocks.{i}.hook_resid_mid        resid_pre + attention output (sequential blocks only)
    blocks.{i}.hook_resid_post       block i's output (before the final norm for the last block)
    blocks.{i}.hook_attn_out         what attention adds to the residual
    blocks.{i}.hook_mlp_out          what the MLP adds to the residual
    blocks.{i}.attn.hook_z           per-head attention output before the output projection,
                                     (batch, pos, n_heads, d_head)
    blocks.{i}.attn.hook_pattern     attention probabilities (batch, n_heads, q_pos, k_pos);
                                     read-only, needs eager attention
    blocks.{i}.mlp.hook_post         MLP neurons: the down projection's input (batch, pos, d_mlp)
    ln_final.hook_normalized         output of the final norm

Layer indices may be negative (-1 is the last block).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from interplab.errors import UserInputError

BLOCK_KINDS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "attn.hook_z", "attn.hook_pattern", "mlp.hook_post",
)
GLOBAL_KINDS = ("hook_embed", "ln_final.hook_normalized")
RESIDUAL_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_embed",
                  "hook_attn_out", "hook_mlp_out", "ln_final.hook_normalized")
READ_ONLY_KINDS = ("attn.hook_pattern",)

# Order of sites inside one block's forward pass (for "which site comes last").
_ORDER = {kind: i for i, kind in enumerate(
    ("hook_resid_pre", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
     "mlp.hook_post", "hook_mlp_out", "hook_resid_post"))}

_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One activation address with a non-negative layer (None for global sites)."""

    layer: int | None
    kind: str

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    @property
    def is_residual(self) -> bool:
        return self.kind in RESIDUAL_KINDS

    @property
    def read_only(self) -> bool:
        return self.kind in READ_ONLY_KINDS

    def depth(self, n_layers: int) -> tuple[int, int]:
        """Sort key in forward order: (block, position inside the block)."""
        if self.kind == "hook_embed":
            return (-1, 0)
        if self.kind == "ln_final.hook_normalized":
            return (n_layers, 0)
        return (self.layer, _ORDER[self.kind])

    def __str__(self) -> str:
        return self.name


def parse_site(name: "str | Site", n_layers: int, *, parallel: bool = False,
               model_name: str = "the model") -> Site:
    """Parse and check a site name for a model (called `model_name` in errors) with `n_layers` blocks."""
    if isinstance(name, Site):
        name = name.name
    if not isinstance(name, str):
        raise TypeError(f"a site is a name like 'blocks.3.hook_resid_post', got {type(name).__name__}")
    if name in GLOBAL_KINDS:
        return Site(None, name)
    match = _BLOCK_RE.match(name)
    if match is None or match.group(2) not in BLOCK_KINDS:
        raise ValueError(_unknown_site_message(name, n_layers))
    layer, kind = check_layer(int(match.group(1)), n_layers, model_name), match.group(2)
    if kind == "hook_resid_mid" and parallel:
        raise ValueError(
            f"site {name!r} does not exist in this architecture: attention and MLP run in parallel, "
            "so there is no residual between them. Use hook_resid_pre, hook_attn_out or hook_mlp_out."
        )
    return Site(layer, kind)


def check_layer(layer, n_layers: int, model_name: str = "the model") -> int:
    """A block index (negative: from the end) as a non-negative int, or the one error message
    every part of interplab gives: "layer 30 is out of range: X has 28 blocks (valid 0..27 or -28..-1)"."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise UserInputError(f"a layer is a block index (an int), got {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise UserInputError(f"layer {layer} is out of range: {model_name} has {n_layers} blocks "
                             f"(valid 0..{n_layers - 1} or -{n_layers}..-1)")
    return layer % n_layers


def resolve_layers(model, layers) -> list[int]:
    """None: every block; an int or a list of ints (negative: from the end), checked and without
    repeats, in the order given."""
    name, n = type(model.hf).__name__, model.n_layers
    if layers is None:
        return list(range(n))
    wanted = [layers] if isinstance(layers, int) else layers
    if isinstance(wanted, (str, bytes)) or not hasattr(wanted, "__iter__"):
        raise UserInputError(f"layers must be an int or a list of ints, got {layers!r}")
    out = [check_layer(layer, n, name) for layer in wanted]
    if not out:
        raise UserInputError("no layers given: name at least one block index")
    return list(dict.fromkeys(out))


def all_site_names(n_layers: int, *, parallel: bool = False) -> list[str]:
    names = ["hook_embed"]
    for layer in range(n_layers):
        for kind in BLOCK_KINDS:
            if not (parallel and kind == "hook_resid_mid"):
                names.append(f"blocks.{layer}.{kind}")
    return names + ["ln_final.hook_normalized"]


def _unknown_site_message(name: str, n_layers: int) -> str:
    match = re.match(r"^blocks\.(-?\d+)\.", name)
    layer = int(match.group(1)) % n_layers if match and n_layers else 0
    candidates = [f"blocks.{layer}.{kind}" for kind in BLOCK_KINDS] + list(GLOBAL_KINDS)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown site {name!r}.{hint} Sites are hook_embed, blocks.{{i}}.<kind> with kind one of "
        f"{', '.join(BLOCK_KINDS)}, and ln_final.hook_normalized."
    )
