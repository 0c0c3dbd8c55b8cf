"""Where things live inside a Hugging Face causal LM, as data.

One `Architecture` per `config.model_type` says which submodules hold the
blocks, the attention and its output projection, the MLP and its down
projection, the norms, and which module's output is what a block adds to its
residual stream. Unknown models get a guess from the module tree; when the
guess fails, the error names the override (`load(..., architecture=...)` or
`register_architecture`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Module paths for one model family. Block-relative paths start inside a block."""

    model_type: str
    """`config.model_type` this entry describes."""
    blocks: str
    """Path from the CausalLM root to the ModuleList of blocks, e.g. "model.layers"."""
    attn: str
    """Attention module inside a block; its output[1] is the pattern under eager attention."""
    attn_o: str
    """Attention output projection inside a block; its input is the concatenated heads (hook_z)."""
    mlp: str
    """MLP module inside a block."""
    mlp_down: str
    """MLP down projection inside a block; its input is the neuron activations (mlp.hook_post)."""
    attn_out: str
    """Module whose output the block adds to the residual after attention (hook_attn_out)."""
    mlp_out: str
    """Module whose output the block adds to the residual after the MLP (hook_mlp_out)."""
    ln1: str | None
    """Norm before attention inside a block (None if the family has none)."""
    ln2: str | None
    """Norm before the MLP inside a block (None if the family has none)."""
    ln_final: str
    """Final norm, from the CausalLM root."""
    parallel: bool = False
    """True when attention and MLP both read the block input (no resid_mid)."""
    parallel_flag: str | None = None
    """Config attribute that switches `parallel` per checkpoint (gpt_neox: use_parallel_residual)."""

    def for_config(self, config) -> "Architecture":
        """This entry with `parallel` read from the config where the family makes it a switch."""
        if self.parallel_flag is None or not hasattr(config, self.parallel_flag):
            return self
        return dataclasses.replace(self, parallel=bool(getattr(config, self.parallel_flag)))


def _llama_like(model_type: str, **changes) -> Architecture:
    base = Architecture(
        model_type=model_type, blocks="model.layers", attn="self_attn", attn_o="self_attn.o_proj",
        mlp="mlp", mlp_down="mlp.down_proj", attn_out="self_attn", mlp_out="mlp",
        ln1="input_layernorm", ln2="post_attention_layernorm", ln_final="model.norm",
    )
    return dataclasses.replace(base, **changes)


# Gemma 2/3 normalise each sublayer's output before adding it to the residual,
# so that norm's output is what the block writes (hook_attn_out / hook_mlp_out).
_GEMMA2 = dict(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
               ln2="pre_feedforward_layernorm")
# OLMo 2 has only post-sublayer norms: no norm in front of attention or MLP.
_OLMO2 = dict(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
              ln1=None, ln2=None)
_GPT2 = Architecture(
    model_type="gpt2", blocks="transformer.h", attn="attn", attn_o="attn.c_proj", mlp="mlp",
    mlp_down="mlp.c_proj", attn_out="attn", mlp_out="mlp", ln1="ln_1", ln2="ln_2",
    ln_final="transformer.ln_f",
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gemma": _llama_like("gemma"),
    "gemma2": _llama_like("gemma2", **_GEMMA2),
    "gemma3_text": _llama_like("gemma3_text", **_GEMMA2),
    "phi3": _llama_like("phi3"),
    "olmo2": _llama_like("olmo2", **_OLMO2),
    "gpt2": _GPT2,
    "gpt_neo": dataclasses.replace(_GPT2, model_type="gpt_neo", attn="attn.attention", attn_out="attn.attention",
                                   attn_o="attn.attention.out_proj"),
    "gpt_neox": Architecture(
        model_type="gpt_neox", blocks="gpt_neox.layers", attn="attention",
        attn_o="attention.dense", mlp="mlp", mlp_down="mlp.dense_4h_to_h", attn_out="attention",
        mlp_out="mlp", ln1="input_layernorm", ln2="post_attention_layernorm",
        ln_final="gpt_neox.final_layer_norm", parallel=True, parallel_flag="use_parallel_residual",
    ),
}


def register_architecture(arch: Architecture) -> None:
    """Add or replace the table entry for `arch.model_type` (for models the table lacks)."""
    ARCHITECTURES[arch.model_type] = arch


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """`root.get_submodule(path)` with an error that names the architecture field to fix."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"{type(root).__name__} has no submodule {path!r}; the architecture table entry "
            "does not fit this model. Pass load(..., architecture=Architecture(...)) with the "
            "right module paths."
        ) from err


def resolve_architecture(model: nn.Module, override: Architecture | None = None) -> Architecture:
    """The table entry for `model`, the override, or a guess; checked against the module tree."""
    config = model.config
    arch = override or ARCHITECTURES.get(config.model_type) or guess_architecture(model)
    arch = arch.for_config(config)
    _check_paths(model, arch)
    return arch


def _check_paths(model: nn.Module, arch: Architecture) -> None:
    blocks = get_submodule(model, arch.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{arch.blocks!r} in {type(model).__name__} is not a list of blocks")
    get_submodule(model, arch.ln_final)
    for path in (arch.attn, arch.attn_o, arch.mlp, arch.mlp_down, arch.attn_out, arch.mlp_out,
                 arch.ln1, arch.ln2):
        if path is not None:
            get_submodule(blocks[0], path)


# Names seen across HF families, most specific first; used only for unknown model types.
_ATTN = ("self_attn", "attention", "attn", "self_attention")
_ATTN_O = ("o_proj", "out_proj", "c_proj", "dense", "wo")
_MLP = ("mlp", "feed_forward", "ffn")
_MLP_DOWN = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out")
_LN1 = ("input_layernorm", "ln_1", "ln1", "attention_norm")
_LN2 = ("post_attention_layernorm", "ln_2", "ln2", "ffn_norm")
_LN_FINAL = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def guess_architecture(model: nn.Module) -> Architecture:
    """Guess module paths for a model type the table lacks, or say how to describe it."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    try:
        blocks_path = _find_block_list(model)
        block = model.get_submodule(blocks_path)[0]
        attn = _first_child(block, _ATTN)
        mlp = _first_child(block, _MLP)
        attn_o = f"{attn}.{_first_child(block.get_submodule(attn), _ATTN_O)}"
        mlp_down = f"{mlp}.{_first_child(block.get_submodule(mlp), _MLP_DOWN)}"
        ln_final = _find_final_norm(model, blocks_path)
    except LookupError as err:
        raise ValueError(
            f"interplab does not know model_type {model_type!r} and could not guess its layout "
            f"({err}). Describe it: load(..., architecture=Architecture(model_type={model_type!r}, "
            "blocks=..., attn=..., attn_o=..., mlp=..., mlp_down=..., attn_out=..., mlp_out=..., "
            "ln1=..., ln2=..., ln_final=...)) or interplab.models.register_architecture(...)."
        ) from None
    return Architecture(
        model_type=model_type, blocks=blocks_path, attn=attn, attn_o=attn_o, mlp=mlp,
        mlp_down=mlp_down, attn_out=attn, mlp_out=mlp,
        ln1=_first_child(block, _LN1, required=False), ln2=_first_child(block, _LN2, required=False),
        ln_final=ln_final, parallel=bool(getattr(model.config, "use_parallel_residual", False)),
    )


def _find_block_list(model: nn.Module) -> str:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == n_layers:
            return name
    raise LookupError(f"no ModuleList of num_hidden_layers={n_layers} blocks")


def _first_child(module: nn.Module, candidates: tuple[str, ...], required: bool = True) -> str | None:
    children = dict(module.named_children())
    for name in candidates:
        if name in children:
            return name
    if required:
        raise LookupError(f"none of {candidates} inside {type(module).__name__}")
    return None


def _find_final_norm(model: nn.Module, blocks_path: str) -> str:
    parent = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    owner = model.get_submodule(parent) if parent else model
    name = _first_child(owner, _LN_FINAL)
    return f"{parent}.{name}" if parent else name
