"""`capture()`: run inputs through the model and keep the activations at chosen sites."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.hooks import HookSession, StopForward
from interplab.models.handle import LoadedModel, as_loaded
from interplab.progress import progress as progress_items
from interplab.sites import Site
from interplab.tokens import Batch, to_batch
from interplab.types import ModelLike


@dataclass
class ActivationCache(Mapping):
    """Activations keyed by canonical site name, each (batch, seq, ...) in input order."""

    activations: dict[str, Tensor]
    """Site name (non-negative layer) -> tensor."""
    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    padding_side: str = "right"
    n_layers: int = 0
    logits: Tensor | None = None
    """(batch, seq, vocab) when capture(..., logits=True)."""
    _aligned: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {tuple(value.shape)}" for name, value in self.activations.items())
        logits = f", logits {tuple(self.logits.shape)}" if self.logits is not None else ""
        return f"ActivationCache({shapes}{logits}; cache[site] is a tensor)"

    def _key(self, name) -> str:
        name = name.name if isinstance(name, Site) else str(name)
        if name in self.activations:
            return name
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].lstrip("-").isdigit():
            parts[1] = str(int(parts[1]) % max(self.n_layers, 1))
            name = ".".join(parts)
        if name not in self.activations:
            raise KeyError(f"site {name!r} was not captured; this cache holds {sorted(self.activations)}")
        return name

    def __getitem__(self, name) -> Tensor:
        return self.activations[self._key(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def by_position(self, name) -> Tensor:
        """The site's activations re-indexed so that index p is absolute position p in every row
        (left padding removed; padding at the end is zero)."""
        key = self._key(name)
        if self.padding_side == "right":
            return self.activations[key]
        if key not in self._aligned:
            self._aligned[key] = _left_align(self.activations[key], self.attention_mask)
        return self._aligned[key]

    @property
    def position_mask(self) -> Tensor:
        """(batch, seq) bool: real tokens, indexed by absolute position."""
        mask = self.attention_mask.bool()
        if self.padding_side == "right":
            return mask
        return _left_align(mask[..., None].float(), self.attention_mask)[..., 0].bool()


def _left_align(acts: Tensor, mask: Tensor) -> Tensor:
    out = torch.zeros_like(acts)
    for row in range(acts.shape[0]):
        real = mask[row].bool()
        n = int(real.sum())
        out[row, :n] = acts[row, real.to(acts.device)]
    return out


def capture(
    model: ModelLike,
    sites: str | Iterable[str],
    inputs,
    *,
    batch_size: int = 8,
    padding_side: str = "right",
    device: str | None = None,
    dtype: torch.dtype | None = None,
    logits: bool = False,
    stop_early: bool = True,
    max_length: int | None = None,
    progress: bool = False,
) -> ActivationCache:
    """Run `inputs` through the model and keep the activations at `sites`.

    `inputs`: a text, texts, token ids (tensor or lists) or a tokenizer output; padded on
    `padding_side`. Only the requested sites are stored, on the device where they were computed
    (a GPU keeps them there: no copy to the host in the forward pass), or moved to `device` when
    given (`device="cpu"` to offload a large capture), and cast to `dtype` (None: keep). With a
    model spread over devices (`load(..., device_map=...)`) each site stays on its block's device. Unless `logits=True`, the forward pass stops
    after the deepest requested site (the remaining layers would be wasted work).
    """
    model = as_loaded(model)
    site_list = _resolve(model, sites)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch = to_batch(model, inputs, side=padding_side, max_length=max_length)
    store: dict[Site, list[Tensor]] = {site: [] for site in site_list}
    deepest = max(site_list, key=lambda s: s.depth(model.n_layers))
    session = HookSession(
        model, {site: [_recorder(store[site], device, dtype)] for site in site_list},
        stop_after=None if logits or not stop_early else deepest,
    )
    all_logits = []
    with _eager_if_needed(model, site_list), _attached(session), torch.no_grad():
        for start in progress_items(range(0, len(batch), batch_size), progress, desc="capture"):
            out = _run(model, batch.slice(start, start + batch_size))
            if logits:
                all_logits.append(_move(out.logits, device, dtype))
    return ActivationCache(
        activations={site.name: torch.cat(chunks) for site, chunks in store.items()},
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        padding_side=padding_side, n_layers=model.n_layers,
        logits=torch.cat(all_logits) if logits else None,
    )


def _resolve(model: LoadedModel, sites) -> list[Site]:
    names = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not names:
        raise ValueError("no sites given: name at least one, e.g. 'blocks.0.hook_resid_post'")
    return list(dict.fromkeys(model.site(name) for name in names))


def _recorder(chunks: list[Tensor], device, dtype):
    def record(act: Tensor, ctx) -> None:
        chunks.append(_move(act.detach(), device, dtype))

    return record


def _move(t: Tensor, device, dtype) -> Tensor:
    t = t.to(device) if device is not None else t
    return t.to(dtype) if dtype is not None else t


def _run(model: LoadedModel, batch: Batch):
    batch = batch.to(model.device)
    try:
        return model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        use_cache=False)
    except StopForward:
        return None


@contextmanager
def _attached(session: HookSession):
    session.attach()
    try:
        yield session
    finally:
        session.remove()


@contextmanager
def _eager_if_needed(model: LoadedModel, sites: list[Site]):
    """Switch to eager attention while a pattern is captured (other kernels do not return it)."""
    if not any(site.kind == "attn.hook_pattern" for site in sites):
        yield
        return
    with eager_attention(model):
        yield


@contextmanager
def eager_attention(model: LoadedModel):
    config = model.hf.config
    previous = getattr(config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    _set_attn(model, "eager")
    try:
        yield
    finally:
        _set_attn(model, previous)


def _set_attn(model: LoadedModel, implementation: str | None) -> None:
    if hasattr(model.hf, "set_attn_implementation"):
        model.hf.set_attn_implementation(implementation)
    else:  # transformers < 4.48
        model.hf.config._attn_implementation = implementation


def residual_sites(model: ModelLike, kind: str = "hook_resid_post") -> list[str]:
    """Every block's site of one kind, e.g. all hook_resid_post sites."""
    model = as_loaded(model)
    return [f"blocks.{i}.{kind}" for i in range(model.n_layers)]

