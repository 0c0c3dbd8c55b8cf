"""Change activations during a forward pass, scoped by `with intervene(...)`.

    with intervene(model, {"blocks.6.hook_resid_post": add_vector(v, scale=4.0)}):
        model.hf.generate(...)

Each intervention is a function `(act, ctx) -> new act` that validates itself
against the site and model before any hook is registered. Positions are absolute
token positions (see `interplab.positions`), so they survive `generate()` with a
KV cache and left padding. Every result is a new tensor; nothing HF holds is
written in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interplab.devices import Copies
from interplab.hooks import HookContext, HookSession
from interplab.models.handle import LoadedModel, as_loaded
from interplab.positions import Positions, as_positions
from interplab.sites import Site


class Intervention:
    """Base class: subclasses implement `__call__(act, ctx)` and may extend `validate`."""

    positions: Positions | None = None

    def validate(self, site: Site, model: LoadedModel) -> None:
        if site.read_only:
            raise ValueError(f"site {site.name} can be read but not changed (it is computed inside "
                             "the attention kernel)")

    def __call__(self, act: Tensor, ctx: HookContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# --- checks -----------------------------------------------------------------------------------

def check_vector(vector, site: Site, model: LoadedModel, what: str = "vector") -> Tensor:
    """A finite tensor shaped like one token's activation at `site`, or a clear error."""
    if not isinstance(vector, Tensor):
        vector = torch.as_tensor(vector)
    expected = model.site_shape(site)
    if tuple(vector.shape) != expected:
        raise ValueError(
            f"{what} has shape {tuple(vector.shape)} but {site.name} on {model.model_id} has "
            f"shape {expected} per token (hidden_size={model.d_model}); it was made for another "
            "model or site"
        )
    if not torch.isfinite(vector).all():
        raise ValueError(f"{what} for {site.name} contains NaN or inf values")
    return vector


def _check_index(index, site: Site, model: LoadedModel) -> tuple[int, ...] | None:
    if index is None:
        return None
    indices = (index,) if isinstance(index, int) else tuple(index)
    size = model.site_shape(site)[0]
    unit = {"attn.hook_z": "heads", "mlp.hook_post": "neurons"}.get(site.kind, "dimensions")
    for i in indices:
        if not isinstance(i, int) or not -size <= i < size:
            raise ValueError(f"index {i} is out of range: {site.name} has {size} {unit} "
                             f"(valid 0..{size - 1})")
    return tuple(i % size for i in indices)


# --- shared mechanics -------------------------------------------------------------------------

def _token_mask(act: Tensor, ctx: HookContext, positions) -> Tensor:
    """(batch, seq, 1, ...) bool broadcastable against `act`."""
    mask = ctx.mask(act, positions)
    return mask.view(*mask.shape, *([1] * (act.dim() - 2)))


def _replace(act: Tensor, new: Tensor, ctx: HookContext, positions, index) -> Tensor:
    """`act` with `new` written at the selected positions (and heads/neurons, when `index`)."""
    mask = _token_mask(act, ctx, positions)
    if index is not None:
        chosen = torch.zeros(act.shape[2], dtype=torch.bool, device=act.device)
        chosen[list(index)] = True
        mask = mask & chosen.view(1, 1, -1, *([1] * (act.dim() - 3)))
    return torch.where(mask, new.to(act.dtype), act)


def _gather_positions(source: Tensor, rows: Tensor, positions: Tensor, site: Site) -> Tensor:
    """source[rows[b], positions[b, s]] -> (batch, seq, ...); padding positions read position 0."""
    if int(positions.max()) >= source.shape[1]:
        raise ValueError(
            f"the source activations for {site.name} cover {source.shape[1]} positions but the run "
            f"reached position {int(positions.max())}; capture the source on inputs at least as long"
        )
    return source[rows[:, None], positions.clamp(min=0)]


def _source_tensor(source, site: Site) -> Tensor:
    """An ActivationCache (indexed by absolute position) or a tensor (batch, seq, ...)."""
    if hasattr(source, "by_position"):
        return source.by_position(site.name)
    if isinstance(source, Tensor):
        return source
    raise TypeError(f"expected an ActivationCache or a tensor for {site.name}, got "
                    f"{type(source).__name__}")


# --- ready-made interventions -----------------------------------------------------------------

@dataclass(eq=False)
class AddVector(Intervention):
    """x <- x + scale * v at the selected positions. With `norm_preserving`, the result is
    rescaled to the norm x had, so only the direction changes."""

    vector: Tensor
    scale: float = 1.0
    positions: Positions | None = None
    norm_preserving: bool = False
    _cast: dict = field(default_factory=dict, repr=False)

    def validate(self, site, model):
        super().validate(site, model)
        self.vector = check_vector(self.vector, site, model)
        if not isinstance(self.scale, (int, float)) or not torch.isfinite(torch.tensor(float(self.scale))):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        self.positions = as_positions(self.positions)

    def __call__(self, act, ctx):
        key = (act.device, act.dtype)
        if key not in self._cast:
            self._cast[key] = (self.scale * self.vector).to(device=act.device, dtype=act.dtype)
        new = act + _token_mask(act, ctx, self.positions) * self._cast[key]
        if self.norm_preserving:
            new = new * (act.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            new = torch.where(_token_mask(act, ctx, self.positions), new, act)
        return new


@dataclass(eq=False)
class ProjectOut(Intervention):
    """x <- x - (x . u) u with u = d / |d|: remove the component along a direction."""

    direction: Tensor
    positions: Positions | None = None
    _copies: Copies = field(default_factory=Copies, repr=False)

    def validate(self, site, model):
        super().validate(site, model)
        self.direction = _check_direction(self.direction, site, model)

    def __call__(self, act, ctx):
        unit = self._copies.like(self.direction, act)
        new = act - (act * unit).sum(-1, keepdim=True) * unit
        return _replace(act, new, ctx, self.positions, None)


@dataclass(eq=False)
class ClampDirection(Intervention):
    """x <- x + (value - x . u) u: set the component along u to `value`."""

    direction: Tensor
    value: float
    positions: Positions | None = None
    _copies: Copies = field(default_factory=Copies, repr=False)

    def validate(self, site, model):
        super().validate(site, model)
        self.direction = _check_direction(self.direction, site, model)
        if not torch.isfinite(torch.tensor(float(self.value))):
            raise ValueError(f"clamp value must be a finite number, got {self.value!r}")

    def __call__(self, act, ctx):
        unit = self._copies.like(self.direction, act)
        new = act + (self.value - (act * unit).sum(-1, keepdim=True)) * unit
        return _replace(act, new, ctx, self.positions, None)


def _check_direction(direction, site: Site, model: LoadedModel) -> Tensor:
    """The unit vector along a checked, non-zero direction."""
    direction = check_vector(direction, site, model, "direction")
    if float(direction.norm()) == 0:
        raise ValueError(f"the direction for {site.name} is the zero vector; it points nowhere")
    return direction / direction.norm()


@dataclass(eq=False)
class ZeroAblate(Intervention):
    """Set activations (or only heads/neurons `index` along the first feature axis) to zero."""

    index: Sequence[int] | int | None = None
    positions: Positions | None = None

    def validate(self, site, model):
        super().validate(site, model)
        self.index = _check_index(self.index, site, model)

    def __call__(self, act, ctx):
        return _replace(act, torch.zeros_like(act), ctx, self.positions, self.index)


@dataclass(eq=False)
class MeanAblate(Intervention):
    """Replace activations by their mean over a reference set: over rows and positions, or,
    with `per_position`, over rows at each absolute position."""

    reference: object
    index: Sequence[int] | int | None = None
    positions: Positions | None = None
    per_position: bool = False
    _means: dict = field(default_factory=dict, repr=False)
    _copies: Copies = field(default_factory=Copies, repr=False)

    def validate(self, site, model):
        super().validate(site, model)
        self.index = _check_index(self.index, site, model)
        source = _source_tensor(self.reference, site)
        mask = _reference_mask(self.reference, source)
        self._means[site] = _masked_mean(source, mask, self.per_position)

    def __call__(self, act, ctx):
        mean = self._copies.like(self._means[ctx.site], act)
        if self.per_position:
            rows = torch.zeros(act.shape[0], dtype=torch.long, device=act.device)
            mean = _gather_positions(mean[None], rows, ctx.positions(act), ctx.site)
        return _replace(act, mean.expand_as(act), ctx, self.positions, self.index)


def _reference_mask(reference, source: Tensor) -> Tensor:
    if hasattr(reference, "position_mask"):
        return reference.position_mask.to(source.device)
    return torch.ones(source.shape[:2], dtype=torch.bool, device=source.device)


def _masked_mean(source: Tensor, mask: Tensor, per_position: bool) -> Tensor:
    weights = mask.to(source.dtype).view(*mask.shape, *([1] * (source.dim() - 2)))
    if per_position:
        return (source * weights).sum(0) / weights.sum(0).clamp_min(1)
    return (source * weights).sum((0, 1)) / weights.sum((0, 1)).clamp_min(1)


@dataclass(eq=False)
class ResampleAblate(Intervention):
    """Replace each row's activations by those of a random reference row, position by position."""

    reference: object
    index: Sequence[int] | int | None = None
    positions: Positions | None = None
    seed: int = 0

    def validate(self, site, model):
        super().validate(site, model)
        self.index = _check_index(self.index, site, model)
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, act, ctx):
        source = _source_tensor(self.reference, ctx.site)
        rows = torch.randint(source.shape[0], (act.shape[0],), generator=self._generator)
        values = _gather_positions(source, rows.to(source.device), ctx.positions(act).to(source.device), ctx.site)
        return _replace(act, values.to(act.device), ctx, self.positions, self.index)


@dataclass(eq=False)
class Patch(Intervention):
    """Write activations from another run (an ActivationCache or a tensor (batch or 1, seq, ...))
    at the selected positions and heads/neurons, matched by absolute position."""

    source: object
    positions: Positions | None = None
    index: Sequence[int] | int | None = None

    def validate(self, site, model):
        super().validate(site, model)
        self.index = _check_index(self.index, site, model)
        source = _source_tensor(self.source, site)
        if tuple(source.shape[2:]) != model.site_shape(site):
            raise ValueError(f"patch source for {site.name} has per-token shape "
                             f"{tuple(source.shape[2:])}, expected {model.site_shape(site)}")

    def __call__(self, act, ctx):
        source = _source_tensor(self.source, ctx.site)
        if source.shape[0] not in (1, act.shape[0]):
            raise ValueError(f"patch source for {ctx.site.name} has {source.shape[0]} rows but the "
                             f"run has {act.shape[0]}; give one row or one per input")
        rows = torch.arange(act.shape[0]) if source.shape[0] > 1 else torch.zeros(act.shape[0], dtype=torch.long)
        values = _gather_positions(source, rows.to(source.device), ctx.positions(act).to(source.device), ctx.site)
        return _replace(act, values.to(act.device), ctx, self.positions, self.index)


# --- constructors (the public, keyword-argument API) -----------------------------------------

def add_vector(vector, *, scale: float = 1.0, positions=None, norm_preserving: bool = False) -> AddVector:
    return AddVector(vector, scale, positions, norm_preserving)


def project_out(direction, *, positions=None) -> ProjectOut:
    return ProjectOut(direction, positions)


def clamp_direction(direction, value: float, *, positions=None) -> ClampDirection:
    return ClampDirection(direction, value, positions)


def zero_ablate(*, index=None, positions=None) -> ZeroAblate:
    return ZeroAblate(index, positions)


def mean_ablate(reference, *, index=None, positions=None, per_position: bool = False) -> MeanAblate:
    return MeanAblate(reference, index, positions, per_position)


def resample_ablate(reference, *, index=None, positions=None, seed: int = 0) -> ResampleAblate:
    return ResampleAblate(reference, index, positions, seed)


def patch(source, *, positions=None, index=None) -> Patch:
    return Patch(source, positions, index)


# --- scoping ----------------------------------------------------------------------------------

SiteFns = Mapping[object, Callable | Sequence[Callable]]


class InterventionHandle:
    """Registered hooks. Use as a context manager, or call `remove()` yourself."""

    def __init__(self, session: HookSession) -> None:
        self._session = session

    def __enter__(self) -> "InterventionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        self._session.remove()

    @property
    def active(self) -> bool:
        return self._session.attached

    def new_sequence(self) -> None:
        """Forget the recorded prompt length: the next forward pass is a new prompt."""
        self._session.tracker.reset()


def intervene(model, interventions: SiteFns) -> InterventionHandle:
    """Attach interventions {site: fn or [fns]} to the model; detached on exit or `remove()`.

    A fn is an `Intervention` or any callable `fn(act)` / `fn(act, ctx)` returning the new
    activation. Everything is validated before the first hook is registered.
    """
    model = as_loaded(model)
    if not isinstance(interventions, Mapping) or not interventions:
        raise ValueError("intervene() needs a non-empty {site: intervention} mapping")
    fns: dict[Site, list[Callable]] = {}
    for name, value in interventions.items():
        site = model.site(name)
        for fn in _as_list(value, site):
            if isinstance(fn, Intervention):
                fn.validate(site, model)
            elif site.read_only:
                Intervention().validate(site, model)
            fns.setdefault(site, []).append(fn)
    return InterventionHandle(HookSession(model, fns).attach())


def _as_list(value, site: Site) -> list[Callable]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for fn in items:
        if not callable(fn):
            raise TypeError(f"the intervention for {site.name} is not callable: {fn!r}")
    return items
