"""How much of the model's behaviour an SAE keeps: its loss with the SAE spliced in.

For token windows, with next-token cross-entropy averaged over the predicted tokens that are
not special tokens:

    L_clean    the model as it is
    L_sae      the SAE's reconstruction x̂ written over the activation at its site
    L_ablated  the activation zero-ablated (x ← 0) or mean-ablated (x ← mean over the windows)

    CE loss recovered = (L_ablated − L_sae) / (L_ablated − L_clean)
                        (Bricken et al. 2023, "Towards Monosemanticity"; Gao et al. 2024 call the
                        loss with the SAE spliced in the "downstream loss")
    KL_sae            = mean over predicted tokens of KL(p_clean ‖ p_sae), in nats
                        (Gao et al. 2024 and SAELens report it beside the CE)

The SAE replaces the activation only at non-special tokens (BOS is left as it is, since SAEs are
trained without it), and the ablation touches the same tokens. The activation-only metrics of
the core (`interplab.sae.metrics`) are accumulated on the same tokens in the same pass.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.interventions import intervene, mean_ablate, on_tokens, zero_ablate
from interplab.models.handle import LoadedModel, as_loaded
from interplab.progress import progress as progress_items
from interplab.sae.metrics import MetricsAccumulator, SAEMetrics, ce_loss_recovered
from interplab.sae.model import SAE
from interplab.sae.store import Harvester, site_width
from interplab.scoring import kl_divergence, log_probs, next_token_nll
from interplab.sites import Site
from interplab.tokens import special_token_mask
from interplab.types import ModelLike

ABLATIONS = ("zero", "mean")


# --------------------------------------------------------------------------------------------
# Matching an SAE to a site
# --------------------------------------------------------------------------------------------


def resolve_sae_site(model: LoadedModel, sae: SAE, site: str | Site | None = None) -> Site:
    """The site the SAE reads (`site`, else the one in its config), checked against the model:
    the SAE's d_in must equal the site's width."""
    if not isinstance(sae, SAE):
        raise TypeError(f"expected an interplab SAE (see interplab.sae.load_sae), got {type(sae).__name__}")
    name = site if site is not None else sae.cfg.site
    if not name:
        raise ValueError("this SAE does not say which site it reads (its config has site=''); pass site=, "
                         "e.g. site='blocks.0.hook_resid_post'")
    resolved = model.site(name)
    width = site_width(model, resolved)
    if sae.cfg.d_in != width:
        raise ValueError(
            f"the SAE reads d_in={sae.cfg.d_in} but {resolved.name} of {model.model_id} has width {width} "
            f"(d_model={model.d_model}); use an SAE trained on this model and site, or another site"
        )
    if sae.cfg.site and site is not None and _other_site(model, sae.cfg.site, resolved):
        warnings.warn(f"the SAE was trained on {sae.cfg.site} but is applied at {resolved.name}", stacklevel=3)
    return resolved


def _other_site(model: LoadedModel, trained_on: str, used: Site) -> bool:
    try:
        return model.site(trained_on) != used
    except ValueError:  # a site this model does not have
        return True


def flat_site(act: Tensor) -> Tensor:
    """(batch, seq, ...) -> (batch, seq, width): attn.hook_z's heads side by side."""
    return act.flatten(2) if act.dim() > 3 else act


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownstreamMetrics:
    """The model's loss with the SAE spliced in, against clean and ablated (see the module docstring)."""

    n_predictions: int
    """Number of next-token predictions scored."""
    clean_loss: float
    """L_clean: mean next-token cross-entropy of the unmodified model (nats)."""
    sae_loss: float
    """L_sae: the same with the SAE's reconstruction spliced in."""
    ablated_loss: float
    """L_ablated: the same with the site zero- or mean-ablated."""
    ablation: str
    """'zero' or 'mean'."""
    ce_loss_recovered: float
    """(L_ablated − L_sae) / (L_ablated − L_clean); 1 is perfect, 0 is no better than ablation."""
    kl_sae: float
    """Mean KL(p_clean ‖ p_sae) per prediction (nats)."""
    kl_ablated: float
    """Mean KL(p_clean ‖ p_ablated) per prediction (nats)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SAEEvaluation:
    """Everything `interplab sae eval` reports: activation metrics and downstream metrics."""

    site: str
    activation: SAEMetrics
    downstream: DownstreamMetrics

    def __repr__(self) -> str:
        a, d = self.activation, self.downstream
        return (f"SAEEvaluation({self.site}: FVU {a.fvu:.3f}, L0 {a.l0:.1f}, dead {a.dead_fraction:.1%}, "
                f"CE loss recovered {d.ce_loss_recovered:.3f}, KL {d.kl_sae:.3f}; .rows() for a table, "
                ".to_dict() to save)")

    def to_dict(self) -> dict:
        return {"site": self.site, **self.activation.to_dict(), **self.downstream.to_dict()}

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, value, meaning) rows for a table."""
        a, d = self.activation, self.downstream
        return [
            ("tokens", f"{a.n_tokens}", "tokens the SAE was evaluated on"),
            ("MSE", f"{a.mse:.4g}", "mean squared error per element"),
            ("FVU", f"{a.fvu:.4f}", "fraction of variance unexplained"),
            ("explained variance", f"{a.explained_variance:.4f}", "1 - FVU"),
            ("L0", f"{a.l0:.2f}", "active latents per token"),
            ("dead", f"{a.dead_fraction:.2%}", "latents that never fired"),
            ("dense", f"{a.dense_fraction:.2%}", f"latents firing on > {a.dense_threshold:.0%} of tokens"),
            ("CE clean", f"{d.clean_loss:.4f}", "next-token loss of the model"),
            ("CE with SAE", f"{d.sae_loss:.4f}", "with the reconstruction spliced in"),
            (f"CE {d.ablation}-ablated", f"{d.ablated_loss:.4f}", f"with the site {d.ablation}-ablated"),
            ("CE loss recovered", f"{d.ce_loss_recovered:.4f}", "(L_abl - L_sae) / (L_abl - L_clean)"),
            ("KL with SAE", f"{d.kl_sae:.4f}", "KL(clean || SAE) per token, nats"),
            (f"KL {d.ablation}-ablated", f"{d.kl_ablated:.4f}", "KL(clean || ablated) per token, nats"),
        ]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_downstream(
    model: ModelLike,
    sae: SAE,
    windows: Int[Tensor, "n seq"],
    *,
    site: str | None = None,
    ablation: str = "zero",
    batch_size: int = 8,
    skip_special_tokens: bool = True,
    dense_threshold: float = 0.1,
    progress: bool = False,
) -> SAEEvaluation:
    """Activation metrics and downstream metrics of `sae` on token windows (n, seq), e.g. from
    `interplab.sae.store.corpus_windows`; see the module docstring for the definitions."""
    model = as_loaded(model)
    resolved = resolve_sae_site(model, sae, site)
    windows = _check_windows(model, windows, batch_size, ablation)
    keep_all = _keep_mask(model, windows, skip_special_tokens)
    mean = _site_mean(model, resolved, windows, keep_all, batch_size) if ablation == "mean" else None
    accumulator = MetricsAccumulator(sae.cfg.d_in, sae.cfg.d_sae, dense_threshold=dense_threshold)
    totals = dict(clean=0.0, sae=0.0, ablated=0.0, kl_sae=0.0, kl_ablated=0.0, n=0)
    was_training = sae.training
    sae.eval()
    try:
        for start in progress_items(range(0, windows.shape[0], batch_size), progress, desc="eval", unit="batch"):
            ids, keep = windows[start:start + batch_size], keep_all[start:start + batch_size]
            _score_batch(model, sae, resolved, ids, keep, mean, accumulator, totals)
    finally:
        sae.train(was_training)
    return SAEEvaluation(resolved.name, accumulator.result(), _downstream_result(totals, ablation))


def _check_windows(model: LoadedModel, windows, batch_size: int, ablation: str) -> Tensor:
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {list(ABLATIONS)}, got {ablation!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a (n, seq) tensor of token ids with n >= 1 and seq >= 2, got {shape}; "
                         "build them with interplab.sae.store.corpus_windows")
    from interplab.sae.store import check_context_length

    check_context_length(model, windows.shape[1])
    return windows.long()


def _keep_mask(model: LoadedModel, windows: Tensor, skip_special_tokens: bool) -> Bool[Tensor, "n seq"]:
    """Tokens the SAE (and the ablation) touch: all but special tokens, unless told otherwise."""
    if not skip_special_tokens:
        return torch.ones_like(windows, dtype=torch.bool)
    return ~special_token_mask(model, windows)


def _site_mean(model: LoadedModel, site: Site, windows: Tensor, keep: Tensor, batch_size: int) -> Tensor:
    """Mean activation at `site` over the kept tokens of all windows (for mean ablation)."""
    harvester = Harvester(model, [site.name], dtype=torch.float64, drop_special_tokens=False)
    total, count = torch.zeros(site_width(model, site), dtype=torch.float64), 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = harvester.run(windows[start:start + batch_size], start)
        rows = keep[start:start + batch_size].flatten()  # (b, seq) -> (b * seq,) in the chunk's row order
        total += chunk.acts[site.name][rows].sum(0)
        count += int(rows.sum())
    return total / max(count, 1)


def _score_batch(model, sae, site, ids, keep, mean, accumulator, totals) -> None:
    """Three forward passes (clean, SAE spliced, ablated) and their losses on one batch; only the
    clean log-probabilities are kept while the other two are scored."""
    from interplab.sae.steer import splice_sae  # sae.steer imports this module

    scored = _scored(model, ids)
    clean = _log_probs(model, ids)
    totals["clean"] += float(next_token_nll(clean, ids)[scored].sum())

    def observe(x, x_hat, acts):  # activation metrics on the kept tokens only
        accumulator.update(x[keep], x_hat[keep], acts[keep])

    # mean ablation: the reference is the mean itself, one (row, position) of the site's shape
    ablation = zero_ablate() if mean is None else mean_ablate(mean.view(1, 1, *model.site_shape(site)))
    for name, edit in (("sae", splice_sae(sae, observe=observe)), ("ablated", ablation)):
        with intervene(model, {site.name: on_tokens(edit, keep)}):
            log_p = _log_probs(model, ids)
        totals[name] += float(next_token_nll(log_p, ids)[scored].sum())
        totals[f"kl_{name}"] += float(kl_divergence(clean[:, :-1], log_p[:, :-1])[scored].sum())
        del log_p
    totals["n"] += int(scored.sum())


def _scored(model: LoadedModel, ids: Tensor) -> Bool[Tensor, "b seq_minus_1"]:
    """Which next-token predictions are scored: those whose target is not a special token."""
    return ~special_token_mask(model, ids[:, 1:])


def _log_probs(model: LoadedModel, ids: Tensor) -> Float[Tensor, "b seq vocab"]:
    """Log-probabilities at every position under whatever interventions are active."""
    return log_probs(model.hf(input_ids=ids.to(model.device), use_cache=False).logits).cpu()


def _downstream_result(totals: dict, ablation: str) -> DownstreamMetrics:
    n = totals["n"]
    if n == 0:
        raise ValueError("no prediction was scored: every target token is a special token; give longer windows")
    clean, sae_loss, ablated = (totals[k] / n for k in ("clean", "sae", "ablated"))
    try:
        recovered = ce_loss_recovered(clean_loss=clean, sae_loss=sae_loss, zero_ablation_loss=ablated)
    except ValueError:
        recovered = math.nan
    return DownstreamMetrics(n, clean, sae_loss, ablated, ablation, recovered,
                             totals["kl_sae"] / n, totals["kl_ablated"] / n)


def forward_loss(model: LoadedModel, windows: Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of the model on windows (special targets skipped), under
    whatever interventions are active."""
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size]
            scored = _scored(model, ids)
            total += float(next_token_nll(_log_probs(model, ids), ids)[scored].sum())
            n += int(scored.sum())
    return total / max(n, 1)
