"""Changing what a model does with SAE features.

Interventions (subclasses of `interplab.interventions.Intervention`, so they compose with
`intervene` and with each other, and take interplab's absolute `positions`):

- `steer_feature`:  x ← x + scale·d_i, with d_i = W_dec[i] / s the change one unit of latent i makes
  to the SAE's reconstruction in the model's own units (s is the SAE's input scale);
  scale is therefore in units of the latent's activation (Templeton et al. 2024, "Scaling
  Monosemanticity", steer by clamping or adding multiples of a feature's maximum activation).
- `clamp_feature`:  f = enc(x); f' = f with f_i ← v; x ← dec(f') + (x − dec(f)), i.e. the SAE's
  reconstruction error is added back so that only latent i changes: x ← x + (v − f_i)·d_i
  (Templeton et al. 2024). Without the error term, x ← dec(f').
- `ablate_feature`: the clamp with v = 0.
- `splice_sae`:     x ← dec(enc(x)), or with the error term dec(enc(x)) + (x − dec(enc(x))) = x.

`FeatureLogitBias` is a transformers LogitsProcessor for `generate()`: it adds scale·b_i to the
next-token logits, where b_i is latent i's vocabulary effect W_U(γ ⊙ r_i) (see
`interplab.sae.features`) centred over the vocabulary and scaled so its largest entry is 1
(scale is then the boost, in nats, of the token the latent promotes most). It leaves the forward
pass untouched; with `only_when_active` it reads (never writes) the site to apply the bias only
on rows whose current token activates the latent.

`compare_steering` puts activation steering, clamping and the logit bias side by side: the
probability gained by a target concept (tokens) against the damage, the increase of the
cross-entropy on neutral text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import LogitsProcessor

from interplab.hooks import HookSession
from interplab.devices import Copies
from interplab.errors import UserInputError
from interplab.interventions import Intervention, check_number, intervene
from interplab.models.handle import LoadedModel, as_loaded
from interplab.positions import Positions
from interplab.sae.downstream import flat_site, forward_loss, resolve_sae_site
from interplab.sae.features import _check_feature, feature_vocab_effect
from interplab.sae.model import SAE
from interplab.sae.store import Harvester
from interplab.scoring import log_probs, masked_mean, next_token_nll
from interplab.sites import Site
from interplab.tokens import special_token_mask
from interplab.types import ModelLike, PositionsLike

METHODS = ("steer", "clamp", "logit_bias", "logit_bias_active")
"""Methods `compare_steering` evaluates."""


def decoder_direction(sae: SAE, feature: int) -> Float[Tensor, " d_in"]:
    """d_i = W_dec[i] / s: what one unit of latent i adds to the reconstruction, in model units."""
    _check_feature(feature, sae.cfg.d_sae)
    return sae.W_dec.detach()[feature] / sae.input_scale


# --------------------------------------------------------------------------------------------
# Interventions
# --------------------------------------------------------------------------------------------


class _SAEIntervention(Intervention):
    """Checks the SAE against the site when bound; applies `_edit` at the selected positions.

    The SAE works on the activation's device (a copy is made once per device, for models spread
    over devices) and in its own dtype: a float32 SAE reads bf16/fp16 activations upcast to float32
    and its edit is cast back to the activation's dtype."""

    sae: SAE

    def _bind(self, site: Site, model: LoadedModel):
        resolve_sae_site(model, self.sae, site.name)
        positions, copies = self.positions, Copies()

        def edit(act: Tensor, ctx) -> Tensor:
            flat = flat_site(act)  # (batch, seq, ...) -> (batch, seq, d_in)
            with torch.no_grad():
                new = self._edit(flat, copies.module_on(self.sae, act.device))
            mask = ctx.mask(act, positions)[..., None]
            return torch.where(mask, new.to(act.dtype), flat).view_as(act)

        return edit

    def _edit(self, x: Tensor, sae: SAE) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class SteerFeature(_SAEIntervention):
    """x ← x + scale·d_i (see the module docstring)."""

    sae: SAE
    feature: int
    scale: float
    positions: PositionsLike = None  # a Positions value once built

    def _check(self):
        _check_sae(self.sae)
        _check_feature(self.feature, self.sae.cfg.d_sae)
        object.__setattr__(self, "scale", check_number(self.scale, "scale"))

    def _edit(self, x, sae):
        return x + (self.scale * decoder_direction(sae, self.feature)).to(x.dtype)


@dataclass(frozen=True, eq=False)
class ClampFeatures(_SAEIntervention):
    """Set latents to `value` through the SAE; with `keep_error`, x ← x + (f' − f) W_dec / s, so
    nothing but those latents changes; without it, x ← dec(f')."""

    sae: SAE
    features: tuple[int, ...]
    value: float
    positions: PositionsLike = None  # a Positions value once built
    keep_error: bool = True

    def _check(self):
        _check_sae(self.sae)
        for feature in self.features:
            _check_feature(feature, self.sae.cfg.d_sae)
        object.__setattr__(self, "value", check_number(self.value, "value"))

    def _edit(self, x, sae):
        acts = sae.encode(x)
        index = list(self.features)
        if not self.keep_error:
            edited = acts.clone()
            edited[..., index] = self.value
            return sae.decode(edited)
        change = self.value - acts[..., index]  # (batch, seq, n_features)
        delta = change @ sae.W_dec[index] / sae.input_scale
        return x + delta.to(x.dtype)


@dataclass(frozen=True, eq=False)
class SpliceSAE(_SAEIntervention):
    """x ← dec(enc(x)); with `keep_error`, the reconstruction error is added back (x ← x̂ + (x − x̂)).
    With `observe`, each (x, x̂, latents) of the edited tokens is handed to it (for metrics)."""

    sae: SAE
    keep_error: bool = False
    positions: PositionsLike = None  # a Positions value once built
    observe: Callable[[Tensor, Tensor, Tensor], None] | None = None

    def _check(self):
        _check_sae(self.sae)

    def _edit(self, x, sae):
        acts = sae.encode(x)
        x_hat = sae.decode(acts).to(x.dtype)
        if self.observe is not None:
            self.observe(x, x_hat, acts)
        return x_hat + (x - x_hat) if self.keep_error else x_hat


def _check_sae(sae) -> None:
    if not isinstance(sae, SAE):
        raise UserInputError(f"expected an interplab SAE (see interplab.sae.load_sae), got {type(sae).__name__}")


def steer_feature(sae: SAE, feature: int, *, scale: float, positions: PositionsLike = None) -> SteerFeature:
    """Add `scale` times latent `feature`'s decoder direction (scale in units of the latent's activation)."""
    return SteerFeature(sae, feature, scale, positions)


def clamp_feature(sae: SAE, feature: int | Sequence[int], value: float, *, positions: PositionsLike = None,
                  keep_error: bool = True) -> ClampFeatures:
    """Set one latent (or several) to `value`, keeping the SAE's error term unless told otherwise."""
    features = (feature,) if isinstance(feature, int) else tuple(feature)
    return ClampFeatures(sae, features, value, positions, keep_error)


def ablate_feature(sae: SAE, feature: int | Sequence[int], *, positions: PositionsLike = None, keep_error: bool = True) -> ClampFeatures:
    """Set latents to zero (a clamp to 0)."""
    return clamp_feature(sae, feature, 0.0, positions=positions, keep_error=keep_error)


def splice_sae(sae: SAE, *, keep_error: bool = False, positions: PositionsLike = None,
               observe: Callable[[Tensor, Tensor, Tensor], None] | None = None) -> SpliceSAE:
    """Replace the activation by the SAE's reconstruction (plus its error when keep_error).
    `observe(x, x_hat, latents)`, when given, sees each edited batch of tokens (for metrics)."""
    return SpliceSAE(sae, keep_error, positions, observe)


# --------------------------------------------------------------------------------------------
# The logit bias
# --------------------------------------------------------------------------------------------


def vocab_bias(model: ModelLike, sae: SAE, feature: int, *, site: str | None = None, fold_norm: bool = True) -> Float[Tensor, " vocab"]:
    """b_i: latent i's vocabulary effect, centred over the vocabulary and scaled to a maximum of 1."""
    effect = feature_vocab_effect(model, sae, feature, site=site, fold_norm=fold_norm).float()
    centred = effect - effect.mean()
    top = float(centred.max())
    if not top > 0:
        raise ValueError(f"latent {feature}'s vocabulary effect is flat; it promotes no token, so there is no bias to add")
    return centred / top


class FeatureLogitBias(LogitsProcessor):
    """Next-token logits ← logits + scale·b_i (see the module docstring).

    >>> bias = FeatureLogitBias(model, sae, 123, scale=4.0)
    >>> interplab.generate(model, prompts, logits_processor=LogitsProcessorList([bias]))

    With `only_when_active=True`, wrap generation in `with bias:` so it can read the latent's
    activation on the current token (a read-only hook at the SAE's site).
    """

    def __init__(self, model, sae: SAE, feature: int, *, scale: float, only_when_active: bool = False,
                 threshold: float = 0.0, site: str | None = None, fold_norm: bool = True) -> None:
        self.model = as_loaded(model)
        self.site = resolve_sae_site(self.model, sae, site)
        _check_feature(feature, sae.cfg.d_sae)
        self.sae, self.feature, self.scale = sae, feature, check_number(scale, "scale")
        self.only_when_active, self.threshold = only_when_active, float(threshold)
        self.bias = vocab_bias(self.model, sae, feature, site=self.site.name, fold_norm=fold_norm)
        self.active: Tensor | None = None
        """(batch,) bool: whether the latent fired on each row's current token (only_when_active)."""
        self._session: HookSession | None = None

    def __enter__(self) -> "FeatureLogitBias":
        if self.only_when_active:
            self._session = HookSession(self.model, {self.site: [self._watch]}).attach()
        return self

    def __exit__(self, *exc) -> None:
        if self._session is not None:
            self._session.remove()
            self._session = None
        self.active = None

    def _watch(self, act: Tensor, ctx) -> None:
        with torch.no_grad():
            last = flat_site(act)[:, -1]  # (batch, d_in): the token whose next token is being chosen
            self.active = self.sae.encode(last)[:, self.feature] > self.threshold

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        bias = self.scale * self.bias.to(device=scores.device, dtype=scores.dtype)
        if not self.only_when_active:
            return scores + bias
        if self.active is None or self.active.shape[0] != scores.shape[0]:
            raise RuntimeError("FeatureLogitBias(only_when_active=True) reads the latent during the forward pass: "
                               "run generate inside `with bias:`")
        return scores + self.active.to(scores.device)[:, None] * bias

    def apply_to_logits(self, logits: Float[Tensor, "... vocab"], active: Tensor | None = None) -> Tensor:
        """logits + scale·b_i at every position (only where `active`, a bool tensor of logits.shape[:-1])."""
        bias = self.scale * self.bias.to(device=logits.device, dtype=logits.dtype)
        return logits + (bias if active is None else active[..., None].to(logits.device) * bias)


# --------------------------------------------------------------------------------------------
# Steering methods compared
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringResult:
    """One method at one scale: target-concept gain against damage on neutral text."""

    method: str
    scale: float
    """The steer scale for 'steer' (latent units), the clamp value for 'clamp', the bias scale in
    nats for the logit biases."""
    target_prob: float
    """Mean probability, over the prompts, that the next token is one of the target tokens."""
    target_gain: float
    """target_prob − that of the unmodified model."""
    neutral_ce: float
    """Next-token cross-entropy on the neutral windows (nats)."""
    damage: float
    """neutral_ce − that of the unmodified model."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SteeringComparison:
    feature: int
    site: str
    target_tokens: list[str]
    clean_target_prob: float
    clean_neutral_ce: float
    max_activation: float
    """The latent's largest activation on the neutral windows (the scale of the steer/clamp grid)."""
    results: list[SteeringResult] = field(default_factory=list)


@torch.no_grad()
def compare_steering(
    model: ModelLike,
    sae: SAE,
    feature: int,
    prompts: Sequence[str],
    neutral_windows: Tensor,
    *,
    site: str | None = None,
    target_tokens: Sequence[str] | None = None,
    n_target_tokens: int = 10,
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    bias_scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0),
    methods: Sequence[str] = METHODS,
    batch_size: int = 8,
) -> SteeringComparison:
    """Target-concept probability gain vs damage (CE on neutral text) for activation steering,
    clamping and the logit bias. Steer scales and clamp values are `scales` × the latent's maximum
    activation on the neutral windows; the biases use `bias_scales` (nats). Targets: the given
    tokens, else the latent's `n_target_tokens` most promoted tokens."""
    model = as_loaded(model)
    resolved = resolve_sae_site(model, sae, site)
    _check_feature(feature, sae.cfg.d_sae)
    _check_compare_inputs(prompts, neutral_windows, methods)
    targets = _target_ids(model, sae, feature, resolved, target_tokens, n_target_tokens)
    prompt_batch = _prompt_batch(model, prompts)
    activity = _feature_activity(model, sae, resolved, feature, neutral_windows, batch_size)
    peak = float(activity.max()) if bool((activity > 0).any()) else math.sqrt(sae.cfg.d_in) / 2
    clean_prob = _target_prob(model, prompt_batch, targets, None)
    clean_ce = forward_loss(model, neutral_windows, batch_size=batch_size)
    comparison = SteeringComparison(feature, resolved.name, [model.tokenizer.decode([t]) for t in targets.tolist()],
                                    clean_prob, clean_ce, peak)
    for method in methods:
        values = bias_scales if method.startswith("logit_bias") else [m * peak for m in scales]
        for value in values:
            prob, ce = _evaluate_method(model, sae, feature, resolved, method, value, prompt_batch, targets,
                                        neutral_windows, activity, batch_size)
            comparison.results.append(SteeringResult(method, value, prob, prob - clean_prob, ce, ce - clean_ce))
    return comparison


def _check_compare_inputs(prompts, windows, methods) -> None:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty texts")
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError("neutral_windows must be a (n, seq) tensor of token ids with seq >= 2 "
                         "(see interplab.sae.store.corpus_windows)")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be taken from {list(METHODS)}, got {list(methods)}")


def _target_ids(model, sae, feature, site, target_tokens, n) -> Tensor:
    if target_tokens:
        tokenizer = model.require_tokenizer()
        ids = []
        for word in target_tokens:
            for variant in (word, " " + word.strip()):
                pieces = tokenizer(variant, add_special_tokens=False)["input_ids"]
                if pieces:
                    ids.append(pieces[0])
        return torch.tensor(sorted(set(ids)), dtype=torch.long)
    effect = feature_vocab_effect(model, sae, feature, site=site.name)
    return effect.topk(min(n, effect.shape[0])).indices


def _prompt_batch(model: LoadedModel, prompts: Sequence[str]):
    from interplab.tokens import to_batch

    return to_batch(model, list(prompts), side="left")


def _target_prob(model: LoadedModel, batch, targets: Tensor, bias: FeatureLogitBias | None, active=None) -> float:
    """Mean probability of the target tokens as the next token after each prompt."""
    logits = model.hf(input_ids=batch.input_ids.to(model.device), attention_mask=batch.attention_mask.to(model.device),
                      use_cache=False).logits[:, -1].float()
    if bias is not None:
        logits = bias.apply_to_logits(logits, active)
    return float(logits.softmax(-1)[:, targets.to(logits.device)].sum(-1).mean())


def _feature_activity(model, sae, site, feature, windows, batch_size) -> Float[Tensor, "n seq"]:
    """The latent's activation on every token of the windows (0 on special tokens)."""
    harvester = Harvester(model, [site.name], drop_special_tokens=False)
    rows = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        x = harvester.run(ids, start).acts[site.name].view(*ids.shape, -1)  # (b * seq, d) -> (b, seq, d)
        rows.append(sae.encode(x)[..., feature].float() * ~special_token_mask(model, ids))
    return torch.cat(rows)


def _evaluate_method(model, sae, feature, site, method, value, prompt_batch, targets, windows, activity,
                     batch_size) -> tuple[float, float]:
    if method in ("steer", "clamp"):
        fn = steer_feature(sae, feature, scale=value) if method == "steer" else clamp_feature(sae, feature, value)
        with intervene(model, {site.name: fn}):
            return (_target_prob(model, prompt_batch, targets, None),
                    forward_loss(model, windows, batch_size=batch_size))
    bias = FeatureLogitBias(model, sae, feature, scale=value, site=site.name)
    only_active = method == "logit_bias_active"
    prompt_active = None
    if only_active:
        prompt_active = _feature_activity(model, sae, site, feature, prompt_batch.input_ids, batch_size)[:, -1] > 0
    return (_target_prob(model, prompt_batch, targets, bias, prompt_active),
            _biased_loss(model, windows, bias, activity > 0 if only_active else None, batch_size))


def _biased_loss(model: LoadedModel, windows: Tensor, bias: FeatureLogitBias, active: Tensor | None,
                 batch_size: int) -> float:
    """Cross-entropy on the windows with the bias added to the logits (special targets skipped)."""
    total, n = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = model.hf(input_ids=ids.to(model.device), use_cache=False).logits.float()
        mask = None if active is None else active[start:start + batch_size]
        log_p = log_probs(bias.apply_to_logits(logits, mask)).cpu()  # (b, seq, vocab)
        part, count = masked_mean(next_token_nll(log_p, ids), ~special_token_mask(model, ids[:, 1:]))
        total, n = total + part, n + count
    return total / max(n, 1)
