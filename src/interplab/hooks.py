"""The only module that registers torch hooks.

A `HookSession` attaches, for each site, one hook that hands the activation to
a chain of functions `fn(act, ctx) -> act` and puts the result back. Block and
attention outputs are tuples in transformers 4.x and bare tensors in 5.x; that
difference is handled here and nowhere else. Hooks return new tensors and never
write into tensors HF keeps. A forward pre-hook on the model records absolute
token positions for every forward pass (see `positions.py`), so interventions
mean the same thing with and without the KV cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from interplab.models.handle import LoadedModel
from interplab.positions import as_positions
from interplab.sites import Site
from interplab.types import PositionsLike

SiteFn = Callable[[Tensor, "HookContext"], Tensor]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once every wanted site was read."""


# --- tuple / tensor normalisation --------------------------------------------------------------

def get_hidden(output) -> Tensor:
    """The hidden-state tensor of a module output (tensor, or tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


def set_hidden(output, hidden: Tensor):
    """`output` with its hidden-state tensor replaced, keeping its structure."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


# --- positions -------------------------------------------------------------------------------

class PositionTracker:
    """Computes each forward pass's absolute positions from the attention mask or cache length."""

    def __init__(self) -> None:
        self.positions: Tensor | None = None  # (batch, seq) long, -1 on padding
        self.prompt_len: Tensor | None = None  # (batch,) real tokens in the current prompt
        self.prompt_ids: Tensor | None = None  # (batch, seq) the current prompt's input
        self.prompt_positions: Tensor | None = None  # (batch, seq) its absolute positions
        self._last_input: Tensor | None = None

    def reset(self) -> None:
        self.positions = self.prompt_len = self._last_input = None
        self.prompt_ids = self.prompt_positions = None

    def on_forward(self, module, args, kwargs) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return
        batch, seq = tokens.shape[0], tokens.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
            real = mask[:, -seq:].bool()
            positions = (mask.long().cumsum(-1) - 1)[:, -seq:].masked_fill(~real, -1)
        else:
            past = _past_length(kwargs)
            positions = (torch.arange(seq, device=tokens.device) + past).expand(batch, seq)
        if not self._continues(tokens, kwargs):
            self.prompt_len = (positions >= 0).sum(-1)
            self.prompt_ids, self.prompt_positions = tokens.detach(), positions
        self.positions = positions

    def _continues(self, tokens: Tensor, kwargs) -> bool:
        """True when this forward extends the previous sequence (a generate() step): it has a
        cache, or (without one) its input starts with the previous input. Anything else is a
        new prompt, whose real-token count becomes the prompt length."""
        previous, self._last_input = self._last_input, tokens.detach()
        if self.prompt_len is None or self.prompt_len.shape[0] != tokens.shape[0]:
            return False
        if _past_length(kwargs) > 0:
            return True
        return (previous is not None and previous.shape[0] == tokens.shape[0]
                and tokens.shape[1] > previous.shape[1]
                and torch.equal(tokens[:, :previous.shape[1]], previous))


def _past_length(kwargs) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        return int(cache_position[0])
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


@dataclass
class HookContext:
    """What a site function may ask about the forward pass it runs in."""

    site: Site
    model: LoadedModel
    tracker: PositionTracker

    def positions(self, act: Tensor) -> Tensor:
        """(batch, seq) absolute positions of `act`'s tokens; -1 marks padding."""
        pos = self.tracker.positions
        if pos is None or pos.shape[0] != act.shape[0] or pos.shape[1] != act.shape[1]:
            pos = torch.arange(act.shape[1], device=act.device).expand(act.shape[0], -1)
        return pos.to(act.device)

    def prompt_len(self, act: Tensor) -> Tensor:
        plen = self.tracker.prompt_len
        if plen is None or plen.shape[0] != act.shape[0]:
            return torch.full((act.shape[0],), act.shape[1], device=act.device)
        return plen.to(act.device)

    def mask(self, act: Tensor, positions: PositionsLike = None) -> Tensor:
        """(batch, seq) bool: which tokens of `act` the position spec selects."""
        tracker = self.tracker
        return as_positions(positions).mask(self.positions(act), self.prompt_len(act),
                                            tracker.prompt_ids, tracker.prompt_positions)


# --- sessions --------------------------------------------------------------------------------

@dataclass
class HookSession:
    """Hooks for a set of sites; attach() registers them, remove() takes every one away."""

    model: LoadedModel
    fns: dict[Site, list[SiteFn]]
    stop_after: Site | None = None
    tracker: PositionTracker = field(default_factory=PositionTracker)
    _handles: list[RemovableHandle] = field(default_factory=list)

    def attach(self) -> "HookSession":
        if self._handles:
            raise RuntimeError("this hook session is already attached")
        try:
            self._handles.append(self.model.hf.register_forward_pre_hook(
                self.tracker.on_forward, with_kwargs=True))
            for site in sorted(self.fns, key=lambda s: s.depth(self.model.n_layers)):
                self._attach_site(site)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.tracker.reset()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _apply_fn(self, site: Site) -> Callable[[Tensor], Tensor]:
        ctx = HookContext(site, self.model, self.tracker)
        chain = [_with_context(fn) for fn in self.fns[site]]
        stop = site == self.stop_after

        def apply(act: Tensor) -> Tensor:
            for fn in chain:
                out = fn(act, ctx)
                act = act if out is None else out
            if stop:
                raise StopForward
            return act

        return apply

    def _attach_site(self, site: Site) -> None:
        apply, m, arch = self._apply_fn(site), self.model, self.model.arch
        kind = site.kind
        if kind == "hook_embed":
            self._output_hook(m.embed, apply)
        elif kind == "ln_final.hook_normalized":
            self._output_hook(m.ln_final, apply)
        elif kind == "hook_resid_pre":
            self._input_hook(m.block(site.layer), apply)
        elif kind == "hook_resid_post":
            self._output_hook(m.block(site.layer), apply)
        elif kind == "hook_attn_out":
            self._output_hook(m.block_module(site.layer, arch.attn_out), apply)
        elif kind == "hook_mlp_out":
            self._output_hook(m.block_module(site.layer, arch.mlp_out), apply)
        elif kind == "hook_resid_mid":
            self._resid_mid_hook(site.layer, apply)
        elif kind == "attn.hook_z":
            self._input_hook(m.block_module(site.layer, arch.attn_o), _per_head(apply, m.n_heads))
        elif kind == "mlp.hook_post":
            self._input_hook(m.block_module(site.layer, arch.mlp_down), apply)
        elif kind == "attn.hook_pattern":
            self._pattern_hook(m.block_module(site.layer, arch.attn), apply)
        else:  # parse_site only produces the kinds above
            raise ValueError(f"no hook for site kind {kind!r}")

    def _output_hook(self, module: nn.Module, apply) -> None:
        def hook(mod, args, output):
            hidden = get_hidden(output)
            new = apply(hidden)
            return None if new is hidden else set_hidden(output, new)

        self._handles.append(module.register_forward_hook(hook))

    def _input_hook(self, module: nn.Module, apply) -> None:
        def hook(mod, args, kwargs):
            if args:
                new = apply(args[0])
                return None if new is args[0] else ((new,) + tuple(args[1:]), kwargs)
            hidden = kwargs["hidden_states"]
            new = apply(hidden)
            return None if new is hidden else (args, {**kwargs, "hidden_states": new})

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _resid_mid_hook(self, layer: int, apply) -> None:
        # resid_mid = resid_pre + attn_out. Read it at the attention-output module and write
        # it back by changing what attention adds, so the block's own sum stays HF's.
        stash: dict[str, Tensor] = {}

        def remember(mod, args, kwargs):
            stash["pre"] = args[0] if args else kwargs["hidden_states"]

        def hook(mod, args, output):
            attn_out, pre = get_hidden(output), stash.pop("pre")
            mid = pre + attn_out
            new = apply(mid)
            return None if new is mid else set_hidden(output, new - pre)

        block = self.model.block(layer)
        self._handles.append(block.register_forward_pre_hook(remember, with_kwargs=True))
        attn_out = self.model.block_module(layer, self.model.arch.attn_out)
        self._handles.append(attn_out.register_forward_hook(hook))

    def _pattern_hook(self, module: nn.Module, apply) -> None:
        def hook(mod, args, output):
            pattern = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if pattern is None:
                raise RuntimeError(
                    "attention weights are not returned by this attention implementation; "
                    "attn.hook_pattern needs eager attention: load(..., attn_implementation='eager')"
                )
            apply(pattern)
            return None

        self._handles.append(module.register_forward_hook(hook))


def _per_head(apply, n_heads: int):
    """Present the output projection's input as (batch, pos, n_heads, d_head)."""

    def per_head(flat: Tensor) -> Tensor:
        z = flat.unflatten(-1, (n_heads, -1))  # (batch, pos, n_heads * d_head) -> (..., n_heads, d_head)
        new = apply(z)
        return flat if new is z else new.flatten(-2)

    return per_head


def _with_context(fn: Callable) -> SiteFn:
    """Let users write `fn(act)` or `fn(act, ctx)`: the context is passed only to a function
    with at least two required positional parameters (or *args), so `def f(act, scale=2.0)`
    keeps its default."""
    if _n_required_positional(fn) >= 2:
        return fn
    return lambda act, ctx: fn(act)


def _n_required_positional(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: assume (act, ctx)
        return 2
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
               for p in params)
