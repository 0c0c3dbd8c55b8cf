"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition").

A model squeezes ``n`` sparse features through ``m < n`` hidden dimensions and
reconstructs them::

    h  = W x                      W: (m, n) in the paper
    x' = ReLU(W^T h + b)          the "ReLU output model" (``activation="relu"``)
    x' = W^T h + b                the linear baseline   (``activation="linear"``)

Each feature x_i is 0 with probability S (the sparsity) and uniform in [0, 1]
otherwise; feature i has importance I_i = r^i and the loss is
sum_i I_i (x_i - x'_i)^2. With dense features the model keeps the m most
important ones in orthogonal directions (like PCA); as features get sparser it
packs more of them into the m dimensions as nearly-orthogonal directions of an
over-complete basis, and the ReLU filters out the interference.

Many independent instances (one per sparsity or importance setting) train at
once in one batched model, as in the paper. The weight tensor is stored as
``W[instance, feature, hidden]``, so ``W[k, i]`` is feature i's direction W_i in
the hidden space (column i of the paper's W).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.progress import progress as progress_items

Activation = Literal["relu", "linear"]
Correlation = Literal["none", "correlated", "anticorrelated"]

#: a feature counts as represented when its direction has norm above this
REPRESENTED_NORM = 0.5


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SuperpositionConfig:
    """One batch of toy models trained together (one instance per sparsity / importance row)."""

    n_features: int = 5
    """n: number of input features."""
    n_hidden: int = 2
    """m: number of hidden dimensions the features are squeezed through."""
    sparsities: tuple[float, ...] = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997)
    """S per instance: the probability that a feature is zero (one instance each, in [0, 1))."""
    importance_decay: float = 0.9
    """r: feature i has importance I_i = r^i (ignored when `importances` is given)."""
    importances: tuple[tuple[float, ...], ...] | None = None
    """Optional explicit importance vector per instance (overrides `importance_decay`)."""
    activation: Activation = "relu"
    """"relu": x' = ReLU(W^T W x + b) (the paper's ReLU output model); "linear": x' = W^T W x + b."""
    correlation: Correlation = "none"
    """"none": independent features; "correlated": features come in adjacent pairs (0,1), (2,3), ...
    that are present together; "anticorrelated": at most one feature of each pair is present."""
    steps: int = 10_000
    """Optimiser steps (paper: 10,000)."""
    batch_size: int = 1024
    """Samples per step, drawn fresh every step (paper: 1024)."""
    lr: float = 1e-3
    """AdamW learning rate (paper: 1e-3)."""
    weight_decay: float = 0.01
    """AdamW weight decay (PyTorch's default, as in the paper's notebook)."""
    seed: int = 0
    """Seed for the initial weights and the sampled data."""

    def __post_init__(self) -> None:
        _check_config(self)

    @property
    def n_instances(self) -> int:
        return len(self.sparsities)

    @property
    def superposition_possible(self) -> bool:
        """Superposition needs more features than dimensions (n > m)."""
        return self.n_features > self.n_hidden


def _check_config(config: SuperpositionConfig) -> None:
    for name in ("n_features", "n_hidden", "steps", "batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(config.sparsities) == 0:
        raise ValueError("sparsities is empty: give at least one sparsity S in [0, 1) (one instance each)")
    for s in config.sparsities:
        if not (0.0 <= s < 1.0):
            raise ValueError(
                f"sparsity {s} is outside [0, 1): S is the probability that a feature is zero, "
                "so S = 1 would mean the features are never present; use e.g. 0.99 instead"
            )
    if config.importance_decay <= 0:
        raise ValueError(f"importance_decay must be > 0 (I_i = r^i), got {config.importance_decay}")
    if config.importances is not None:
        shape = (config.n_instances, config.n_features)
        rows = config.importances
        if len(rows) != shape[0] or any(len(row) != shape[1] for row in rows):
            raise ValueError(f"importances must have one row of {shape[1]} values per sparsity, i.e. shape {shape}")
        if any(v < 0 for row in rows for v in row):
            raise ValueError("importances must be >= 0")
    if config.activation not in ("relu", "linear"):
        raise ValueError(f"activation must be 'relu' or 'linear', got {config.activation!r}")
    if config.correlation not in ("none", "correlated", "anticorrelated"):
        raise ValueError(f"correlation must be 'none', 'correlated' or 'anticorrelated', got {config.correlation!r}")
    if config.correlation != "none" and config.n_features % 2:
        raise ValueError(f"correlated features come in pairs: n_features must be even, got {config.n_features}")
    if config.correlation == "anticorrelated" and min(config.sparsities) < 0.5:
        raise ValueError(
            "anticorrelated pairs have one of two features present with probability 2(1-S), "
            f"which needs S >= 0.5; got min sparsity {min(config.sparsities)}"
        )
    if config.lr <= 0 or config.weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={config.lr}, weight_decay={config.weight_decay}")


def importance_matrix(config: SuperpositionConfig) -> Float[Tensor, "instances features"]:
    """I[k, i]: importance of feature i in instance k (r^i unless given explicitly)."""
    if config.importances is not None:
        return torch.tensor(config.importances, dtype=torch.float32)
    decay = config.importance_decay ** torch.arange(config.n_features, dtype=torch.float32)
    return decay.expand(config.n_instances, -1).clone()


# ----------------------------------------------------------------------------- model and data


class ToyModel(nn.Module):
    """Batched ReLU output model (or linear baseline): x' = act(W^T W x + b), per instance."""

    def __init__(
        self,
        n_instances: int,
        n_features: int,
        n_hidden: int,
        activation: Activation = "relu",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.activation = activation
        # xavier-normal per instance (std depends on n and m only, not on the number of instances)
        std = math.sqrt(2.0 / (n_features + n_hidden))
        self.W = nn.Parameter(torch.randn(n_instances, n_features, n_hidden, generator=generator) * std)
        self.b = nn.Parameter(torch.zeros(n_instances, n_features))

    def hidden(self, x: Float[Tensor, "batch instances features"]) -> Float[Tensor, "batch instances hidden"]:
        return torch.einsum("bif,ifh->bih", x, self.W)

    def forward(self, x: Float[Tensor, "batch instances features"]) -> Float[Tensor, "batch instances features"]:
        out = torch.einsum("bih,ifh->bif", self.hidden(x), self.W) + self.b
        return torch.relu(out) if self.activation == "relu" else out


def sample_features(
    batch_size: int,
    feature_probability: Float[Tensor, "instances"],
    n_features: int,
    correlation: Correlation = "none",
    generator: torch.Generator | None = None,
) -> Float[Tensor, "batch instances features"]:
    """x_i = 0 with probability S = 1 - p, else uniform in [0, 1] (pairs share presence if correlated)."""
    n_instances = feature_probability.shape[0]
    p = feature_probability[None, :, None]
    if correlation == "none":
        # one draw does both jobs: u > S = 1 - p has probability p, and given that, (u - S) / p is
        # uniform in [0, 1); so relu(u - S) / p is the feature (computed in place: it is the hot loop)
        u = torch.rand(batch_size, n_instances, n_features, generator=generator)
        return u.sub_(1.0 - p).clamp_min_(0.0).div_(p)
    values = torch.rand(batch_size, n_instances, n_features, generator=generator)
    if correlation == "correlated":
        pair_present = torch.rand(batch_size, n_instances, n_features // 2, generator=generator) < p
        present = pair_present.repeat_interleave(2, dim=-1)  # (b, i, n/2) -> (b, i, n): pair k -> 2k, 2k+1
    else:  # anticorrelated: a pair is "on" with prob 2p, then exactly one of its two features is present
        pair_on = torch.rand(batch_size, n_instances, n_features // 2, generator=generator) < 2 * p
        first = torch.rand(batch_size, n_instances, n_features // 2, generator=generator) < 0.5
        present = torch.stack([pair_on & first, pair_on & ~first], dim=-1)  # (b, i, n/2, 2)
        present = present.flatten(-2)  # (b, i, n/2, 2) -> (b, i, n)
    return torch.where(present, values, torch.zeros(()))


def importance_weighted_loss(
    x: Float[Tensor, "batch instances features"],
    x_hat: Float[Tensor, "batch instances features"],
    importance: Float[Tensor, "instances features"],
) -> Float[Tensor, "instances"]:
    """Per-instance loss mean_batch mean_i I_i (x_i - x'_i)^2 (the paper's sum, scaled by 1/n)."""
    return (importance * (x - x_hat) ** 2).mean(dim=(0, 2))


# ----------------------------------------------------------------------------- training


@dataclass
class SuperpositionRun:
    """A trained batch of toy models and its loss curve."""

    config: SuperpositionConfig
    model: ToyModel
    losses: Float[Tensor, "logged instances"]
    """Per-instance loss at the logged steps."""
    logged_steps: list[int] = field(default_factory=list)

    @property
    def W(self) -> Float[Tensor, "instances features hidden"]:
        return self.model.W.detach()

    @property
    def b(self) -> Float[Tensor, "instances features"]:
        return self.model.b.detach()


def train_superposition(
    config: SuperpositionConfig,
    *,
    progress: bool = False,
    log_every: int = 100,
    initial_W: Float[Tensor, "instances features hidden"] | None = None,
) -> SuperpositionRun:
    """Train all instances of `config` at once (AdamW, fresh batch every step).

    `initial_W` replaces the random initial weights (e.g. to start from chosen sign patterns).
    """
    generator = torch.Generator().manual_seed(config.seed)
    model = ToyModel(config.n_instances, config.n_features, config.n_hidden, config.activation, generator)
    if initial_W is not None:
        if initial_W.shape != model.W.shape:
            raise ValueError(f"initial_W has shape {tuple(initial_W.shape)}, expected {tuple(model.W.shape)}")
        with torch.no_grad():
            model.W.copy_(initial_W)
    importance = importance_matrix(config)
    feature_probability = 1.0 - torch.tensor(config.sparsities, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses, logged = [], []
    desc = f"superposition n={config.n_features} m={config.n_hidden} x{config.n_instances}"
    for step in progress_items(range(config.steps), progress, desc=desc):
        x = sample_features(config.batch_size, feature_probability, config.n_features, config.correlation, generator)
        loss = importance_weighted_loss(x, model(x), importance)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # instances are independent: summing keeps their gradients separate
        optimizer.step()
        if step % log_every == 0 or step == config.steps - 1:
            losses.append(loss.detach())
            logged.append(step)
    return SuperpositionRun(config, model, torch.stack(losses), logged)


# ----------------------------------------------------------------------------- analysis


def feature_norms(W: Float[Tensor, "instances features hidden"]) -> Float[Tensor, "instances features"]:
    """||W_i||: how strongly each feature is represented (about 1 if represented, 0 if dropped)."""
    return W.norm(dim=-1)


def _overlaps(W: Float[Tensor, "instances features hidden"]) -> Float[Tensor, "instances features features"]:
    """(W_hat_i . W_j)^2 for all i, j (row i uses the unit direction of feature i)."""
    W_hat = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return torch.einsum("kih,kjh->kij", W_hat, W) ** 2


def superposition_interference(W: Float[Tensor, "instances features hidden"]) -> Float[Tensor, "instances features"]:
    """sum_{j != i} (W_hat_i . W_j)^2 (Elhage et al. 2022): 0 when feature i has a dimension to itself."""
    overlaps = _overlaps(W)
    return overlaps.sum(-1) - overlaps.diagonal(dim1=-2, dim2=-1)


def feature_dimensionality(W: Float[Tensor, "instances features hidden"]) -> Float[Tensor, "instances features"]:
    """D_i = ||W_i||^2 / sum_j (W_hat_i . W_j)^2, j = i included (Elhage et al. 2022).

    The fraction of a dimension feature i gets: 1 for a dedicated dimension, 1/2 for an
    antipodal pair, 2/5 for a pentagon, 0 if not represented. sum_i D_i <= m always
    (Cauchy-Schwarz on the Gram matrix W W^T, which has rank <= m).
    """
    norms_sq = W.norm(dim=-1) ** 2
    return norms_sq / _overlaps(W).sum(-1).clamp_min(1e-12)


def dimensions_per_feature(W: Float[Tensor, "instances features hidden"]) -> Float[Tensor, "instances"]:
    """D* = m / ||W||_F^2 (Elhage et al. 2022): hidden dimensions per represented feature."""
    return W.shape[-1] / (W**2).sum(dim=(-2, -1)).clamp_min(1e-12)


def n_represented(W: Float[Tensor, "instances features hidden"], threshold: float = REPRESENTED_NORM) -> Tensor:
    """Number of features with ||W_i|| > threshold, per instance."""
    return (feature_norms(W) > threshold).sum(-1)


def feature_angles_2d(W: Float[Tensor, "features 2"], threshold: float = REPRESENTED_NORM) -> Tensor:
    """Angles in degrees between consecutive represented feature directions in a 2-D hidden space.

    Sorted counter-clockwise, wrapping round; a regular pentagon gives five angles of 72 degrees.
    """
    if W.shape[-1] != 2:
        raise ValueError(f"feature_angles_2d needs a 2-D hidden space (m=2), got m={W.shape[-1]}")
    kept = W[W.norm(dim=-1) > threshold]
    theta = torch.sort(torch.atan2(kept[:, 1], kept[:, 0])).values
    gaps = torch.diff(theta, append=theta[:1] + 2 * math.pi)
    return torch.rad2deg(gaps)


@dataclass(frozen=True)
class InstanceReport:
    """Measured quantities of one trained instance (JSON-ready)."""

    sparsity: float
    feature_probability: float
    importance: list[float]
    loss: float
    feature_norms: list[float]
    superposition: list[float]
    dimensionality: list[float]
    dimensionality_sum: float
    dimensions_per_feature: float
    n_represented: int
    bias: list[float]


@dataclass(frozen=True)
class SuperpositionReport:
    """The summary of one batched run (what `summary.json` holds for it)."""

    config: dict
    instances: list[InstanceReport]
    notes: list[str]

    def to_dict(self) -> dict:
        return {"config": self.config, "notes": self.notes, "instances": [asdict(r) for r in self.instances]}


def evaluate_loss(run: SuperpositionRun, *, batch_size: int = 20_000, seed: int = 1234) -> Float[Tensor, "instances"]:
    """Per-instance loss on one large fresh batch (less noisy than the training log)."""
    config = run.config
    generator = torch.Generator().manual_seed(seed)
    p = 1.0 - torch.tensor(config.sparsities, dtype=torch.float32)
    with torch.no_grad():
        x = sample_features(batch_size, p, config.n_features, config.correlation, generator)
        return importance_weighted_loss(x, run.model(x), importance_matrix(config))


def report(run: SuperpositionRun, *, eval_batch_size: int = 20_000) -> SuperpositionReport:
    """Per-instance norms, superposition, dimensionality, D* and the number of features represented."""
    config, W, b = run.config, run.W, run.b
    importance = importance_matrix(config)
    losses = evaluate_loss(run, batch_size=eval_batch_size)
    norms, interference = feature_norms(W), superposition_interference(W)
    dims, d_star, counts = feature_dimensionality(W), dimensions_per_feature(W), n_represented(W)
    instances = [
        InstanceReport(
            sparsity=float(s),
            feature_probability=float(1 - s),
            importance=importance[k].tolist(),
            loss=float(losses[k]),
            feature_norms=norms[k].tolist(),
            superposition=interference[k].tolist(),
            dimensionality=dims[k].tolist(),
            dimensionality_sum=float(dims[k].sum()),
            dimensions_per_feature=float(d_star[k]),
            n_represented=int(counts[k]),
            bias=b[k].tolist(),
        )
        for k, s in enumerate(config.sparsities)
    ]
    return SuperpositionReport(asdict(config), instances, _notes(config, counts))


def _notes(config: SuperpositionConfig, counts: Tensor) -> list[str]:
    notes = []
    if not config.superposition_possible:
        notes.append(
            f"no superposition is possible: m={config.n_hidden} >= n={config.n_features}, "
            "so every feature can have a dimension of its own"
        )
    over = [s for s, c in zip(config.sparsities, counts.tolist()) if c > config.n_hidden]
    if over and config.superposition_possible:
        notes.append(f"more features than dimensions are represented (superposition) at sparsities {over}")
    return notes


# ----------------------------------------------------------------------------- phase diagram (n=2, m=1)

PHASES = ("not represented", "dedicated dimension", "superposition")


@dataclass(frozen=True)
class PhaseDiagram:
    """Which phase feature 2 is in, on a grid of (relative importance, density), for n=2, m=1."""

    relative_importance: list[float]
    """Importance of feature 2 relative to feature 1 (rows of `phase`)."""
    density: list[float]
    """Feature density 1 - S (columns of `phase`)."""
    phase: list[list[int]]
    """Index into PHASES: 0 feature 2 not represented, 1 it gets the dimension, 2 both share it."""
    activation: Activation = "relu"


def phase_diagram(
    *,
    relative_importances: list[float],
    densities: list[float],
    activation: Activation = "relu",
    restarts: int = 2,
    steps: int = 4000,
    batch_size: int = 512,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
) -> PhaseDiagram:
    """Train an n=2, m=1 model for every (relative importance, density) cell, all in one batch.

    Each cell is trained `restarts` times and the run with the lowest loss is kept, since the
    two-feature landscape has local minima: with one hidden dimension, weights that start with
    the same sign can get stuck (both features on one side, neither represented well), so the
    restarts alternate between starting with equal and with opposite signs.
    Classification of the kept weights:
    feature 2 not represented (||W_2|| <= 0.5); dedicated dimension (||W_2|| > 0.5 and
    ||W_1|| <= 0.5); superposition (both > 0.5, necessarily sharing the one dimension).
    """
    if restarts <= 0:
        raise ValueError(f"restarts must be a positive integer, got {restarts}")
    cells = [(r, d) for r in relative_importances for d in densities]
    rows = [(r, d) for r, d in cells for _ in range(restarts)]  # each cell repeated `restarts` times
    config = SuperpositionConfig(
        n_features=2, n_hidden=1, sparsities=tuple(1.0 - d for _, d in rows),
        importances=tuple((1.0, r) for r, _ in rows), activation=activation,
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)
    initial = torch.randn(len(rows), 2, 1, generator=generator).abs() * math.sqrt(2 / 3)  # xavier std, n=2, m=1
    initial[:, 1] *= torch.tensor([1.0, -1.0]).repeat((restarts + 1) // 2)[:restarts].repeat(len(cells))[:, None]
    run = train_superposition(config, progress=progress, initial_W=initial)
    best = evaluate_loss(run).view(len(cells), restarts).argmin(-1)  # (cells * restarts,) -> (cells, restarts)
    W = run.W.view(len(cells), restarts, 2, 1)  # (instances, 2, 1) -> (cells, restarts, 2, 1)
    W = W[torch.arange(len(cells)), best]  # (cells, 2, 1)
    phases = classify_phase(W).view(len(relative_importances), len(densities))  # (cells,) -> (rows, cols)
    return PhaseDiagram(list(relative_importances), list(densities), phases.tolist(), activation)


def classify_phase(W: Float[Tensor, "instances 2 1"]) -> Tensor:
    """0: feature 2 not represented; 1: feature 2 has the dimension alone; 2: both share it."""
    on = feature_norms(W) > REPRESENTED_NORM
    return torch.where(~on[:, 1], 0, torch.where(on[:, 0], 2, 1))
