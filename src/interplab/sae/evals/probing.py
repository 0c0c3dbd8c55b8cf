"""k-sparse probing: how few SAE latents a linear probe needs to read a labelled property.

For a binary task with activations X (n, d_in) and labels y (n,) split into train and test:

    f          = SAE latent activations of X                     (n, d_sae)
    score_i    = | mean(f_i | y = 1) − mean(f_i | y = 0) |        on the train split
    S_k        = the k latents with the largest score_i
    acc_sae(k) = test accuracy of a logistic-regression probe on f[:, S_k]
    acc_raw    = test accuracy of a logistic-regression probe on X itself

Gurnee et al. 2023, "Finding Neurons in a Haystack" (k-sparse probing with mean-difference
selection); Gao et al. 2024 and SAEBench (Karvonen et al. 2025) apply it to SAE latents with
k in {1, 2, 5, 10, 20} and compare with the probe on the raw activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.errors import UserInputError

DEFAULT_KS = (1, 2, 5, 10, 20)
"""Numbers of latents the sparse probes may use (SAEBench's choice)."""


@dataclass(frozen=True)
class ProbingTask:
    """A labelled binary task: activations at one site and a 0/1 label per row."""

    name: str
    """What the label says, e.g. 'first letter is s'."""
    acts: Float[Tensor, "n d_in"]
    """Activations (one row per example)."""
    labels: Tensor
    """(n,) 0/1 labels."""


@dataclass(frozen=True)
class SparseProbingResult:
    """Test accuracies of the sparse probes and of the raw-activation probe on one task."""

    task: str
    """The task's name."""
    n_train: int
    """Training examples."""
    n_test: int
    """Test examples."""
    raw_accuracy: float
    """Accuracy of a probe on the raw activations."""
    sae_accuracy: dict[int, float]
    """k -> accuracy of a probe on the top-k latents."""
    top_latents: list[int]
    """Latents in order of mean-difference score (as many as the largest k)."""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sae_accuracy"] = {str(k): v for k, v in self.sae_accuracy.items()}
        return data


def mean_difference_scores(latents: Float[Tensor, "n d_sae"], labels: Tensor) -> Float[Tensor, " d_sae"]:
    """|mean over positives − mean over negatives| of each latent."""
    positive = labels.bool()
    return (latents[positive].mean(0) - latents[~positive].mean(0)).abs()


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, seed: int = 0) -> float:
    """Test accuracy of an L2-regularised logistic regression fitted on the train split
    (features standardised with the train split's statistics)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_x.double().numpy(), train_y.numpy())
    return float(probe.score(test_x.double().numpy(), test_y.numpy()))


def sparse_probing(
    sae,
    task: ProbingTask,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> SparseProbingResult:
    """k-sparse probing of `sae` on `task` (see the module docstring)."""
    ks = _check_task(sae, task, ks, test_fraction)
    train, test = split_indices(task.labels, test_fraction, seed)
    x, y = task.acts.float(), task.labels.long()
    with torch.no_grad():
        latents = sae.encode(x).float()  # (n, d_sae)
    order = mean_difference_scores(latents[train], y[train]).argsort(descending=True)
    accuracy = {}
    for k in ks:
        chosen = order[: min(k, latents.shape[1])]
        accuracy[k] = probe_accuracy(latents[train][:, chosen], y[train], latents[test][:, chosen], y[test], seed=seed)
    raw = probe_accuracy(x[train], y[train], x[test], y[test], seed=seed)
    return SparseProbingResult(task.name, len(train), len(test), raw, accuracy, order[: max(ks)].tolist())


def split_indices(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A stratified random split: each class keeps `test_fraction` of its rows for the test."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for value in labels.unique():
        rows = (labels == value).nonzero()[:, 0]
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_test = max(1, round(len(rows) * test_fraction))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train), torch.cat(test)


def _check_task(sae, task: ProbingTask, ks: Sequence[int], test_fraction: float) -> list[int]:
    if task.acts.dim() != 2 or task.acts.shape[1] != sae.cfg.d_in:
        raise UserInputError(f"task {task.name!r} has activations of shape {tuple(task.acts.shape)} but the SAE reads "
                             f"d_in={sae.cfg.d_in}; build the task at the SAE's site ({sae.cfg.site or 'unknown'})")
    if task.labels.shape != (task.acts.shape[0],):
        raise UserInputError(f"task {task.name!r}: {task.acts.shape[0]} rows but labels of shape {tuple(task.labels.shape)}")
    counts = torch.bincount(task.labels.long(), minlength=2)
    if len(counts) != 2 or int(counts.min()) < 4:
        raise UserInputError(f"task {task.name!r} needs 0/1 labels with at least 4 examples of each class; "
                             f"got counts {counts.tolist()}")
    if not 0 < test_fraction < 1:
        raise UserInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if not ks or bad:
        raise UserInputError(f"ks must be positive ints such as {list(DEFAULT_KS)}, got {list(ks)}")
    return sorted(set(ks))
