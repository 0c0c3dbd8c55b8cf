"""Change activations during a forward pass, scoped by `with intervene(...)`.

    with intervene(model, {"blocks.6.hook_resid_post": add_vector(v, scale=4.0)}):
        model.hf.generate(...)

An intervention is an immutable value (a frozen dataclass) built by one of the constructors
below. Its model-independent fields (scale, positions, index, vector values) are checked when
it is built; `bind(site, model)` checks the rest against the site and model (shapes, index
ranges) and returns the function the hook runs. `intervene` binds every intervention before
the first hook is registered, so a bad one leaves the model untouched. Positions are absolute
token positions (see `interplab.positions`), so they survive `generate()` with a KV cache and
left padding. Every result is a new tensor; nothing HF holds is written in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.devices import Copies
from interplab.errors import UserInputError
from interplab.hooks import HookContext, HookSession, SiteFn
from interplab.models.handle import LoadedModel, as_loaded
from interplab.positions import Positions, as_positions
from interplab.sites import Site
from interplab.types import ModelLike, PositionsLike

Index = Sequence[int] | int | None


class Intervention:
    """Base class of the ready-made interventions: subclasses are frozen dataclasses.

    A subclass may define `_check()` (model-independent checks, run when the value is built)
    and must define `_bind(site, model) -> fn(act, ctx)`. A field named `positions` is turned
    into a `Positions` value when the intervention is built, so a bad selection fails there.
    """

    def __post_init__(self) -> None:
        if "positions" in getattr(self, "__dataclass_fields__", {}):
            object.__setattr__(self, "positions", as_positions(self.positions))
        self._check()

    def _check(self) -> None:
        """Model-independent checks; raise UserInputError."""

    def bind(self, site: Site, model: LoadedModel) -> SiteFn:
        """Check this intervention against `site` on `model`; return the function the hook runs.
        Nothing is changed: binding the same value twice gives two independent functions."""
        if site.read_only:
            raise UserInputError(f"site {site.name} can be read but not changed (it is computed "
                                 "inside the attention kernel)")
        return self._bind(site, model)

    def _bind(self, site: Site, model: LoadedModel) -> SiteFn:  # pragma: no cover - abstract
        raise NotImplementedError


# --- checks -----------------------------------------------------------------------------------

def as_vector(vector, what: str = "vector") -> Tensor:
    """A real, finite tensor, or a clear error (complex values are refused, not truncated)."""
    if not isinstance(vector, Tensor):
        try:
            vector = torch.as_tensor(vector)
        except (TypeError, ValueError, RuntimeError) as err:
            raise UserInputError(f"{what} must be a tensor or a list of numbers: {err}") from None
    if vector.is_complex():
        raise UserInputError(f"{what} is complex-valued ({vector.dtype}); interventions need real "
                             "values: pass vector.real if that is what you mean")
    if not (vector.is_floating_point() or vector.dtype in (torch.int32, torch.int64, torch.int16,
                                                           torch.int8, torch.uint8)):
        raise UserInputError(f"{what} must hold numbers, got dtype {vector.dtype}")
    if vector.numel() == 0:
        raise UserInputError(f"{what} is empty")
    vector = vector.detach()
    if not vector.is_floating_point():
        vector = vector.float()
    if not torch.isfinite(vector).all():
        raise UserInputError(f"{what} contains NaN or inf values")
    return vector


def check_vector(vector, site: Site, model: LoadedModel, what: str = "vector") -> Tensor:
    """A finite real tensor shaped like one token's activation at `site`, or a clear error."""
    vector = as_vector(vector, f"{what} for {site.name}")
    expected = model.site_shape(site)
    if tuple(vector.shape) != expected:
        raise UserInputError(
            f"{what} has shape {tuple(vector.shape)} but {site.name} on {model.model_id} has "
            f"shape {expected} per token (hidden_size={model.d_model}); it was made for another "
            "model or site"
        )
    return vector


def check_number(value, what: str) -> float:
    """A finite real number (not a bool), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserInputError(f"{what} must be a finite real number, got {value!r}")
    return float(value)


def _check_flag(value, what: str) -> None:
    if not isinstance(value, bool):
        raise UserInputError(f"{what} must be True or False, got {value!r}")


def _as_index(index: Index) -> tuple[int, ...] | None:
    """Heads/neurons as a tuple of ints (range checked at bind time), or None for all."""
    if index is None:
        return None
    indices = (index,) if isinstance(index, int) else index
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
        raise UserInputError(f"index must be an int or a non-empty list of ints, got {index!r}")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise UserInputError(f"index must hold ints, got {i!r}")
    return tuple(indices)


def _check_index(index: tuple[int, ...] | None, site: Site, model: LoadedModel) -> tuple[int, ...] | None:
    if index is None:
        return None
    size = model.site_shape(site)[0]
    unit = {"attn.hook_z": "heads", "mlp.hook_post": "neurons"}.get(site.kind, "dimensions")
    for i in index:
        if not -size <= i < size:
            raise UserInputError(f"index {i} is out of range: {site.name} has {size} {unit} "
                                 f"(valid 0..{size - 1} or -{size}..-1)")
    return tuple(i % size for i in index)


def _check_source(source, what: str) -> None:
    if hasattr(source, "by_position"):
        return
    if not isinstance(source, Tensor):
        raise UserInputError(f"{what} must be an ActivationCache or a tensor (batch, seq, ...), "
                             f"got {type(source).__name__}")
    if source.dim() < 3:
        raise UserInputError(f"{what} tensor must be (batch, seq, ...), got shape {tuple(source.shape)}")
    as_vector(source, what)


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
        raise UserInputError(
            f"the source activations for {site.name} cover {source.shape[1]} positions but the run "
            f"reached position {int(positions.max())}; capture the source on inputs at least as long"
        )
    return source[rows[:, None], positions.clamp(min=0)]


def _source_tensor(source, site: Site) -> Tensor:
    """An ActivationCache (indexed by absolute position) or a tensor (batch, seq, ...)."""
    if hasattr(source, "by_position"):
        return source.by_position(site.name)
    return source


def _check_source_shape(source: Tensor, site: Site, model: LoadedModel, what: str) -> None:
    if tuple(source.shape[2:]) != model.site_shape(site):
        raise UserInputError(f"{what} for {site.name} has per-token shape {tuple(source.shape[2:])}, "
                             f"expected {model.site_shape(site)}")


# --- ready-made interventions -----------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AddVector(Intervention):
    """x <- x + scale * v at the selected positions. With `norm_preserving`, the result is
    rescaled to the norm x had, so only the direction changes."""

    vector: object  # a tensor once built
    scale: float = 1.0
    positions: PositionsLike = None  # a Positions value once built
    norm_preserving: bool = False

    def _check(self):
        object.__setattr__(self, "vector", as_vector(self.vector))
        object.__setattr__(self, "scale", check_number(self.scale, "scale"))
        _check_flag(self.norm_preserving, "norm_preserving")

    def _bind(self, site, model):
        added = self.scale * check_vector(self.vector, site, model)
        copies = Copies()  # one copy per (device, dtype) of the activations it meets
        positions, norm_preserving = self.positions, self.norm_preserving

        def add(act, ctx):
            mask = _token_mask(act, ctx, positions)
            new = act + mask * copies.like(added, act)
            if norm_preserving:
                new = new * (act.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                new = torch.where(mask, new, act)
            return new

        return add


def _check_direction(direction, site: Site, model: LoadedModel) -> Tensor:
    """The unit vector along a checked, non-zero direction."""
    direction = check_vector(direction, site, model, "direction")
    if float(direction.norm()) == 0:
        raise UserInputError(f"the direction for {site.name} is the zero vector; it points nowhere")
    return direction / direction.norm()


@dataclass(frozen=True, eq=False)
class ProjectOut(Intervention):
    """x <- x - (x . u) u with u = d / |d|: remove the component along a direction."""

    direction: object  # a tensor once built
    positions: PositionsLike = None  # a Positions value once built

    def _check(self):
        object.__setattr__(self, "direction", as_vector(self.direction, "direction"))

    def _bind(self, site, model):
        direction, positions, copies = _check_direction(self.direction, site, model), self.positions, Copies()

        def project(act, ctx):
            unit = copies.like(direction, act)
            new = act - (act * unit).sum(-1, keepdim=True) * unit
            return _replace(act, new, ctx, positions, None)

        return project


@dataclass(frozen=True, eq=False)
class ClampDirection(Intervention):
    """x <- x + (value - x . u) u: set the component along u = d / |d| to `value`."""

    direction: object  # a tensor once built
    value: float
    positions: PositionsLike = None  # a Positions value once built

    def _check(self):
        object.__setattr__(self, "direction", as_vector(self.direction, "direction"))
        object.__setattr__(self, "value", check_number(self.value, "clamp value"))

    def _bind(self, site, model):
        direction, value, positions = _check_direction(self.direction, site, model), self.value, self.positions
        copies = Copies()

        def clamp(act, ctx):
            unit = copies.like(direction, act)
            new = act + (value - (act * unit).sum(-1, keepdim=True)) * unit
            return _replace(act, new, ctx, positions, None)

        return clamp


@dataclass(frozen=True, eq=False)
class ZeroAblate(Intervention):
    """Set activations (or only heads/neurons `index` along the first feature axis) to zero."""

    index: Index = None  # a tuple of ints (or None) once built
    positions: PositionsLike = None  # a Positions value once built

    def _check(self):
        object.__setattr__(self, "index", _as_index(self.index))

    def _bind(self, site, model):
        index, positions = _check_index(self.index, site, model), self.positions
        return lambda act, ctx: _replace(act, torch.zeros_like(act), ctx, positions, index)


@dataclass(frozen=True, eq=False)
class MeanAblate(Intervention):
    """Replace activations by their mean over a reference set: over rows and positions, or,
    with `per_position`, over rows at each absolute position."""

    reference: object
    index: Index = None  # a tuple of ints (or None) once built
    positions: PositionsLike = None  # a Positions value once built
    per_position: bool = False

    def _check(self):
        _check_source(self.reference, "the mean-ablation reference")
        object.__setattr__(self, "index", _as_index(self.index))
        _check_flag(self.per_position, "per_position")

    def _bind(self, site, model):
        index, positions, per_position = _check_index(self.index, site, model), self.positions, self.per_position
        source = _source_tensor(self.reference, site)
        _check_source_shape(source, site, model, "the mean-ablation reference")
        mean = _masked_mean(source, _reference_mask(self.reference, source), per_position)
        copies = Copies()

        def ablate(act, ctx):
            values = copies.like(mean, act)
            if per_position:
                rows = torch.zeros(act.shape[0], dtype=torch.long, device=act.device)
                values = _gather_positions(values[None], rows, ctx.positions(act), ctx.site)
            return _replace(act, values.expand_as(act), ctx, positions, index)

        return ablate


def _reference_mask(reference, source: Tensor) -> Tensor:
    if hasattr(reference, "position_mask"):
        return reference.position_mask.to(source.device)
    return torch.ones(source.shape[:2], dtype=torch.bool, device=source.device)


def _masked_mean(source: Tensor, mask: Tensor, per_position: bool) -> Tensor:
    weights = mask.to(source.dtype).view(*mask.shape, *([1] * (source.dim() - 2)))
    if per_position:
        return (source * weights).sum(0) / weights.sum(0).clamp_min(1)
    return (source * weights).sum((0, 1)) / weights.sum((0, 1)).clamp_min(1)


@dataclass(frozen=True, eq=False)
class ResampleAblate(Intervention):
    """Replace each row's activations by those of a random reference row, position by position."""

    reference: object
    index: Index = None  # a tuple of ints (or None) once built
    positions: PositionsLike = None  # a Positions value once built
    seed: int = 0

    def _check(self):
        _check_source(self.reference, "the resample-ablation reference")
        object.__setattr__(self, "index", _as_index(self.index))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserInputError(f"seed must be an int, got {self.seed!r}")

    def _bind(self, site, model):
        index, positions = _check_index(self.index, site, model), self.positions
        source = _source_tensor(self.reference, site)
        _check_source_shape(source, site, model, "the resample-ablation reference")
        generator = torch.Generator().manual_seed(self.seed)

        def resample(act, ctx):
            rows = torch.randint(source.shape[0], (act.shape[0],), generator=generator)
            return _write_rows(act, ctx, source, rows, positions, index)

        return resample


def _write_rows(act: Tensor, ctx, source: Tensor, rows: Tensor, positions, index) -> Tensor:
    """Write `source[rows]`, matched by absolute position, into `act` at the selected tokens
    (what resample ablation and patching share)."""
    values = _gather_positions(source, rows.to(source.device), ctx.positions(act).to(source.device), ctx.site)
    return _replace(act, values.to(act.device), ctx, positions, index)


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Write activations from another run (an ActivationCache or a tensor (batch or 1, seq, ...))
    at the selected positions and heads/neurons, matched by absolute position."""

    source: object
    positions: PositionsLike = None  # a Positions value once built
    index: Index = None  # a tuple of ints (or None) once built

    def _check(self):
        _check_source(self.source, "the patch source")
        object.__setattr__(self, "index", _as_index(self.index))

    def _bind(self, site, model):
        index, positions = _check_index(self.index, site, model), self.positions
        source = _source_tensor(self.source, site)
        _check_source_shape(source, site, model, "the patch source")

        def write(act, ctx):
            if source.shape[0] not in (1, act.shape[0]):
                raise UserInputError(f"patch source for {ctx.site.name} has {source.shape[0]} rows but "
                                     f"the run has {act.shape[0]}; give one row or one per input")
            rows = (torch.arange(act.shape[0]) if source.shape[0] > 1
                    else torch.zeros(act.shape[0], dtype=torch.long))
            return _write_rows(act, ctx, source, rows, positions, index)

        return write


@dataclass(frozen=True, eq=False)
class OnTokens(Intervention):
    """Another intervention, applied only on the tokens a per-row mask selects."""

    intervention: Intervention
    tokens: Tensor

    def _check(self):
        if not isinstance(self.intervention, Intervention):
            raise UserInputError(f"on_tokens() wraps an Intervention, got {type(self.intervention).__name__}")
        if not isinstance(self.tokens, Tensor) or self.tokens.dtype != torch.bool or self.tokens.dim() != 2:
            raise UserInputError("on_tokens() needs a (batch, seq) bool tensor indexed by absolute position")

    def _bind(self, site, model):
        inner, tokens = self.intervention.bind(site, model), self.tokens

        def apply(act, ctx):
            positions = ctx.positions(act)  # (batch, seq) absolute, -1 on padding
            if act.shape[0] != tokens.shape[0] or int(positions.max()) >= tokens.shape[1]:
                raise UserInputError(f"the token mask for {site.name} is {tuple(tokens.shape)} but the run "
                                     f"has {act.shape[0]} rows reaching position {int(positions.max())}")
            chosen = tokens.to(act.device).gather(1, positions.clamp(min=0)) & (positions >= 0)
            return torch.where(chosen.view(*chosen.shape, *([1] * (act.dim() - 2))), inner(act, ctx), act)

        return apply


# --- constructors (the public, keyword-argument API) -----------------------------------------

def add_vector(vector, *, scale: float = 1.0, positions: PositionsLike = None,
               norm_preserving: bool = False) -> AddVector:
    """Add `scale * vector` to the activation at the selected token positions.

    `vector` has one token's shape at the site ((d_model,) on the residual stream; checked
    when attached). `scale` is the strength of the edit (0 changes nothing; negative subtracts).
    With `norm_preserving`, each edited activation is rescaled to its old norm, so only its
    direction changes. Complex or non-finite vectors are refused.
    """
    return AddVector(vector, scale, positions, norm_preserving)


def project_out(direction, *, positions: PositionsLike = None) -> ProjectOut:
    """Remove the component along `direction`: x <- x - (x . u) u with u = direction / |direction|.

    Only the direction matters (its length is ignored); a zero direction is refused. This is
    zero direction-ablation: afterwards x . u = 0 at the selected positions.
    """
    return ProjectOut(direction, positions)


def clamp_direction(direction, value: float, *, positions: PositionsLike = None) -> ClampDirection:
    """Set the component along `direction` to `value`: x <- x + (value - x . u) u, u = direction / |direction|.

    Everything orthogonal to the direction is kept; `value` is in the activation's own units
    along the unit vector (value=0 is `project_out`).
    """
    return ClampDirection(direction, value, positions)


def zero_ablate(*, index: Index = None, positions: PositionsLike = None) -> ZeroAblate:
    """Set the activation to zero at the selected positions.

    `index` restricts the edit to entries of the first per-token axis: heads at
    `attn.hook_z`, neurons at `mlp.hook_post`, dimensions elsewhere (an int or a list of ints).
    """
    return ZeroAblate(index, positions)


def mean_ablate(reference, *, index: Index = None, positions: PositionsLike = None,
                per_position: bool = False) -> MeanAblate:
    """Replace the activation by its mean over `reference` (an ActivationCache holding the site,
    or a tensor (batch, seq, ...)).

    The mean is over every real token of every reference row, or with `per_position` over
    rows at each absolute position (the run may not go past the reference's length). `index`
    restricts the edit to heads/neurons as in `zero_ablate`.
    """
    return MeanAblate(reference, index, positions, per_position)


def resample_ablate(reference, *, index: Index = None, positions: PositionsLike = None,
                    seed: int = 0) -> ResampleAblate:
    """Replace each row's activation by that of a random reference row at the same absolute
    position (a new draw on every forward pass, repeatable through `seed`).

    `reference` is an ActivationCache holding the site or a tensor (batch, seq, ...); `index`
    restricts the edit to heads/neurons as in `zero_ablate`.
    """
    return ResampleAblate(reference, index, positions, seed)


def patch(source, *, positions: PositionsLike = None, index: Index = None) -> Patch:
    """Write the activation of another run, matched by absolute position.

    `source` is an ActivationCache holding the site or a tensor (batch or 1, seq, ...); one
    source row is used for every input row, otherwise row i patches row i. `positions` and
    `index` select which tokens and heads/neurons are overwritten (the rest is kept).
    """
    return Patch(source, positions, index)


def on_tokens(intervention: Intervention, tokens: Tensor) -> OnTokens:
    """Apply `intervention` only where `tokens` is True: a (batch, seq) bool tensor indexed by
    absolute position, one row per input row (e.g. "every token but the special ones").
    Use it when the selection differs between rows; `positions` selects the same for all."""
    return OnTokens(intervention, tokens)


# --- scoping ----------------------------------------------------------------------------------

SiteFns = Mapping[object, "Intervention | Callable | Sequence[Intervention | Callable]"]


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


def intervene(model: ModelLike, interventions: SiteFns) -> InterventionHandle:
    """Attach interventions {site: fn or [fns]} to the model; detached on exit or `remove()`.

    A fn is an `Intervention` or any callable `fn(act)` / `fn(act, ctx)` returning the new
    activation (it gets `ctx` only when it has two required positional parameters).
    Everything is checked and bound before the first hook is registered.
    """
    model = as_loaded(model)
    if not isinstance(interventions, Mapping) or not interventions:
        raise UserInputError("intervene() needs a non-empty {site: intervention} mapping")
    fns: dict[Site, list[Callable]] = {}
    for name, value in interventions.items():
        site = model.site(name)
        for fn in _as_list(value, site):
            if isinstance(fn, Intervention):
                fn = fn.bind(site, model)
            elif site.read_only:
                raise UserInputError(f"site {site.name} can be read but not changed (it is "
                                     "computed inside the attention kernel)")
            fns.setdefault(site, []).append(fn)
    return InterventionHandle(HookSession(model, fns).attach())


def _as_list(value, site: Site) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for fn in items:
        if not (isinstance(fn, Intervention) or callable(fn)):
            raise UserInputError(f"the intervention for {site.name} is not callable: {fn!r}")
    return items
