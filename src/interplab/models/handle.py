"""`LoadedModel`: the unmodified HF model, its tokenizer and where things live in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from interplab.models.arch import Architecture, get_submodule, resolve_architecture


@dataclass
class LoadedModel:
    """A Hugging Face causal LM as interplab sees it. `hf` is never modified outside a `with`."""

    hf: nn.Module
    """The Hugging Face `*ForCausalLM` model, exactly as `from_pretrained` returned it."""
    tokenizer: object | None
    """Its tokenizer (None when a bare model was wrapped)."""
    arch: Architecture
    """Module paths for this model family."""
    name: str = ""
    """What the user asked for: an alias, a folder or a Hub id."""
    source: str = ""
    """Where the weights came from (a folder or Hub id)."""
    _blocks: nn.ModuleList | None = field(default=None, init=False, repr=False)

    @classmethod
    def wrap(cls, model, tokenizer=None, architecture: Architecture | None = None) -> "LoadedModel":
        """Wrap a bare HF model (or return a LoadedModel as it is)."""
        if isinstance(model, LoadedModel):
            return model
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(
                f"expected an interplab LoadedModel or a Hugging Face model, got {type(model).__name__}"
            )
        arch = resolve_architecture(model, architecture)
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        return cls(hf=model, tokenizer=tokenizer, arch=arch, name=name, source=name)

    # --- structure -------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @cached_property
    def blocks(self) -> nn.ModuleList:
        return get_submodule(self.hf, self.arch.blocks)

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def block_module(self, layer: int, path: str) -> nn.Module:
        return get_submodule(self.blocks[layer], path)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @cached_property
    def d_model(self) -> int:
        return int(self.hf.get_input_embeddings().weight.shape[1])

    @cached_property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @cached_property
    def d_head(self) -> int:
        return _in_features(self.block_module(0, self.arch.attn_o)) // self.n_heads

    @cached_property
    def d_mlp(self) -> int:
        return _in_features(self.block_module(0, self.arch.mlp_down))

    @cached_property
    def vocab_size(self) -> int:
        return int(self.hf.get_output_embeddings().weight.shape[0])

    @property
    def model_id(self) -> str:
        """A stable name for metadata: the alias or path the user loaded."""
        return self.name or self.source

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (its execution device when the model is
        spread over devices with a device_map, where offloaded weights sit on 'meta')."""
        planned = _planned_device(self.hf, self.embed)
        return planned if planned is not None else self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def embed(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    @property
    def unembed(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def ln_final(self) -> nn.Module:
        return get_submodule(self.hf, self.arch.ln_final)

    def site(self, name) -> "Site":
        """Parse and check a site name against this model (see `interplab.sites`)."""
        from interplab.sites import parse_site

        return parse_site(name, self.n_layers, parallel=self.arch.parallel, model_name=type(self.hf).__name__)

    def site_names(self) -> list[str]:
        from interplab.sites import all_site_names

        return all_site_names(self.n_layers, parallel=self.arch.parallel)

    def site_shape(self, site) -> tuple[int, ...]:
        """Trailing shape of one token's activation at `site` (after batch and position)."""
        kind = self.site(site).kind
        if kind == "attn.hook_z":
            return (self.n_heads, self.d_head)
        if kind == "mlp.hook_post":
            return (self.d_mlp,)
        if kind == "attn.hook_pattern":
            return (self.n_heads,)
        return (self.d_model,)

    def describe(self) -> dict:
        """Sizes and layout as plain data (for `interplab info`)."""
        return {
            "name": self.model_id, "class": type(self.hf).__name__,
            "model_type": self.arch.model_type, "n_layers": self.n_layers, "d_model": self.d_model,
            "n_heads": self.n_heads, "d_head": self.d_head, "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size, "parallel_attn_mlp": self.arch.parallel,
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
        }

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer attached: pass token ids, or wrap it with "
                "LoadedModel.wrap(model, tokenizer)"
            )
        return self.tokenizer


def _planned_device(hf: nn.Module, module: nn.Module) -> torch.device | None:
    """The device accelerate's device_map runs `module` on, or None without a device_map."""
    device_map = getattr(hf, "hf_device_map", None)
    if not device_map:
        return None
    name = next((n for n, m in hf.named_modules() if m is module), "")
    owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    if not owners:
        return None
    placed = device_map[max(owners, key=len)]
    if placed in ("disk", "meta"):  # offloaded: run on the CPU
        return torch.device("cpu")
    return torch.device(f"cuda:{placed}" if isinstance(placed, int) else placed)


def _in_features(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    # GPT-2's Conv1D stores weight as (in, out)
    return int(module.weight.shape[0])


def as_loaded(model) -> LoadedModel:
    """Accept a LoadedModel or a bare HF model everywhere a model is expected."""
    return LoadedModel.wrap(model)
