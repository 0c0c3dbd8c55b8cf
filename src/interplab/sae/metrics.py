"""How good an SAE is on activations alone (no model needed).

Definitions, for N tokens x_n ∈ ℝ^d_in, reconstructions x̂_n and latent activations f(x_n) ∈ ℝ^d_sae:

- MSE                 = (1 / (N·d_in)) Σ_n ‖x_n − x̂_n‖²                   (per element, input space)
- FVU                 = Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²,  x̄ = (1/N) Σ_n x_n
  (fraction of variance unexplained, about the mean; sparsify and Gao et al. 2024 report it)
- explained variance  = 1 − FVU
- L0                  = (1/N) Σ_n #{i : f_i(x_n) ≠ 0}
- firing frequency    p_i = (1/N) #{n : f_i(x_n) ≠ 0};
  dead fraction = fraction of latents with p_i = 0; dense fraction = fraction with p_i > a threshold
  (0.1 by default).

The model-dependent metric, CE loss recovered, needs the model's losses with the SAE spliced in;
`ce_loss_recovered` states the formula and takes those three numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.sae.model import SAE


@dataclass(frozen=True)
class SAEMetrics:
    """Activation-only quality metrics of an SAE over a set of tokens (see the module docstring)."""

    n_tokens: int
    """Number of tokens evaluated."""

    mse: float
    """Mean squared error per element, in the input's own space."""

    fvu: float
    """Fraction of variance unexplained (about the per-feature mean of the evaluated tokens)."""

    explained_variance: float
    """1 − fvu."""

    l0: float
    """Mean number of active latents per token."""

    dead_fraction: float
    """Fraction of latents that never fired on the evaluated tokens."""

    dense_fraction: float
    """Fraction of latents that fired on more than `dense_threshold` of the tokens."""

    dense_threshold: float
    """The firing frequency above which a latent counts as dense."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def mse(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """(1 / (N·d)) Σ_n ‖x_n − x̂_n‖²."""
    return float((x.double() - x_hat.double()).pow(2).mean())


def fraction_of_variance_unexplained(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖² with x̄ the mean of x over tokens."""
    x, x_hat = x.double().reshape(-1, x.shape[-1]), x_hat.double().reshape(-1, x.shape[-1])
    return _ratio(float((x - x_hat).pow(2).sum()), float((x - x.mean(0)).pow(2).sum()))


def l0(acts: Float[Tensor, "n d_sae"]) -> float:
    """Mean number of non-zero latents per token."""
    return float((acts != 0).sum(-1).double().mean())


def dead_fraction(acts: Float[Tensor, "n d_sae"]) -> float:
    """Fraction of latents that are zero on every token of `acts` (never fired)."""
    return float(((acts != 0).sum(0) == 0).double().mean())


class MetricsAccumulator:
    """Streams `SAEMetrics` over batches in float64: Σ‖x − x̂‖², Σx, Σ‖x‖², firing counts."""

    def __init__(self, d_in: int, d_sae: int, *, dense_threshold: float = 0.1) -> None:
        if not 0 <= dense_threshold <= 1:
            raise ValueError(f"dense_threshold is a firing frequency in [0, 1], got {dense_threshold}")
        self.dense_threshold = dense_threshold
        self.n_tokens = 0
        self.squared_error = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq_norm = 0.0
        self.active = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: Float[Tensor, "n d_in"], x_hat: Float[Tensor, "n d_in"], acts: Float[Tensor, "n d_sae"]) -> None:
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        fired = (acts != 0).cpu()
        self.n_tokens += x.shape[0]
        self.squared_error += float((x - x_hat).pow(2).sum())
        self.sum_x += x.sum(0)
        self.sum_sq_norm += float(x.pow(2).sum())
        self.active += float(fired.sum())
        self.fire_counts += fired.sum(0)

    def result(self) -> SAEMetrics:
        if self.n_tokens == 0:
            raise ValueError("no tokens were evaluated: pass at least one non-empty batch")
        n = self.n_tokens
        total_variance = self.sum_sq_norm - float(self.sum_x.pow(2).sum()) / n  # Σ‖x − x̄‖²
        fvu = _ratio(self.squared_error, total_variance)
        frequency = self.fire_counts.double() / n
        return SAEMetrics(
            n_tokens=n,
            mse=self.squared_error / (n * self.sum_x.numel()),
            fvu=fvu,
            explained_variance=1.0 - fvu,
            l0=self.active / n,
            dead_fraction=float((self.fire_counts == 0).double().mean()),
            dense_fraction=float((frequency > self.dense_threshold).double().mean()),
            dense_threshold=self.dense_threshold,
        )


@torch.no_grad()
def evaluate_sae(
    sae: SAE, batches: Iterable[Float[Tensor, "*_batch d_in"]], *, dense_threshold: float = 0.1
) -> SAEMetrics:
    """`SAEMetrics` of `sae` (in inference mode: encode then decode) over a stream of activation batches.
    Each batch has its own leading shape (hence `*_batch`, not checked across batches)."""
    accumulator = MetricsAccumulator(sae.cfg.d_in, sae.cfg.d_sae, dense_threshold=dense_threshold)
    was_training = sae.training
    sae.eval()
    try:
        for x in batches:
            x = x.reshape(-1, x.shape[-1]).to(sae.W_enc.device)  # (..., d_in) -> (tokens, d_in)
            acts = sae.encode(x)
            accumulator.update(x, sae.decode(acts), acts)
    finally:
        sae.train(was_training)
    return accumulator.result()


def ce_loss_recovered(*, clean_loss: float, sae_loss: float, zero_ablation_loss: float) -> float:
    """CE loss recovered = (L_zero − L_sae) / (L_zero − L_clean).

    L_clean: the model's next-token cross-entropy; L_sae: the same with the SAE's reconstruction
    spliced in at its site; L_zero: with that activation zero-ablated (Bricken et al. 2023; Gao et
    al. 2024 discuss it as "downstream loss"). 1 means the SAE loses nothing, 0 means it is as bad
    as deleting the activation. The model-side code computes the three losses.
    """
    for name, value in (("clean_loss", clean_loss), ("sae_loss", sae_loss), ("zero_ablation_loss", zero_ablation_loss)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if zero_ablation_loss == clean_loss:
        raise ValueError(
            "zero_ablation_loss equals clean_loss, so CE loss recovered is undefined: "
            "ablating this site does not change the loss"
        )
    return (zero_ablation_loss - sae_loss) / (zero_ablation_loss - clean_loss)


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0:
        return math.nan if numerator > 0 else 0.0
    return numerator / denominator
