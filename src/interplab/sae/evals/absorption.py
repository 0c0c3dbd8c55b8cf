"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption").

For each letter c, on activations X (n, d_in) of tokens labelled by their first letter:

    p_c          unit direction of a logistic-regression probe "starts with c" on X (train split)
    main latent  the latent with the largest mean difference between c-tokens and the others
                 (the k = 1 sparse probe, as in the paper's feature-splitting step)
    TP_c         test tokens that start with c and that the probe classifies as c
    absorbed     a token of TP_c on which the main latent does not fire (activation 0) while an
                 absorbing latent does: an active latent j ≠ main whose decoder direction is
                 aligned with the probe, cos(W_dec[j], p_c) ≥ τ (τ = 0.025 in the paper), and
                 whose contribution to the probe projection, a_j·(W_dec[j] · p_c), is the
                 largest among the active latents
    absorption rate(c)    = |absorbed| / |TP_c|
    false-negative rate(c) = |{t ∈ TP_c : main latent silent}| / |TP_c|

The SAE's mean absorption rate is the average over letters with enough examples (SAEBench,
Karvonen et al. 2025, reports the same per-letter average).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.errors import UserInputError
from interplab.sae.evals.probing import mean_difference_scores, split_indices

COSINE_THRESHOLD = 0.025
"""τ: the smallest cosine between an absorbing latent's decoder row and the probe (Chanin et al.)."""


@dataclass(frozen=True)
class LetterAbsorption:
    """Absorption of one letter's feature."""

    letter: str
    """The letter (the class label)."""
    main_latent: int
    """The latent chosen as the letter's feature."""
    probe_true_positives: int
    """|TP_c|: test tokens starting with the letter that the probe gets right."""
    false_negatives: int
    """Tokens of TP_c on which the main latent is silent."""
    absorbed: int
    """Tokens of TP_c absorbed by another latent."""
    absorbing_latents: dict[int, int]
    """latent -> number of tokens it absorbed."""

    @property
    def absorption_rate(self) -> float:
        return self.absorbed / self.probe_true_positives if self.probe_true_positives else float("nan")

    @property
    def false_negative_rate(self) -> float:
        return self.false_negatives / self.probe_true_positives if self.probe_true_positives else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["absorbing_latents"] = {str(k): v for k, v in self.absorbing_latents.items()}
        return {**data, "absorption_rate": _finite(self.absorption_rate),
                "false_negative_rate": _finite(self.false_negative_rate)}


@dataclass(frozen=True)
class AbsorptionResult:
    """Per-letter absorption and the mean over letters."""

    letters: list[LetterAbsorption]
    """One entry per evaluated letter."""

    @property
    def mean_absorption_rate(self) -> float:
        rates = [r.absorption_rate for r in self.letters if r.probe_true_positives]
        return sum(rates) / len(rates) if rates else float("nan")

    @property
    def mean_false_negative_rate(self) -> float:
        rates = [r.false_negative_rate for r in self.letters if r.probe_true_positives]
        return sum(rates) / len(rates) if rates else float("nan")

    def to_dict(self) -> dict:
        return {"mean_absorption_rate": _finite(self.mean_absorption_rate),
                "mean_false_negative_rate": _finite(self.mean_false_negative_rate),
                "letters": [r.to_dict() for r in self.letters]}


def _finite(value: float) -> float | None:
    """JSON has no NaN: a rate with no tokens to measure it on is written as null."""
    return None if math.isnan(value) else value


def probe_direction(train_x: Tensor, train_y: Tensor, *, seed: int = 0) -> tuple[Float[Tensor, " d"], object]:
    """Unit weight vector of a logistic-regression probe on raw activations, and the probe."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, random_state=seed)
    probe.fit(train_x.double().numpy(), train_y.numpy())
    weight = torch.tensor(probe.coef_[0], dtype=torch.float32)
    return weight / weight.norm(), probe


def letter_absorption(
    sae, acts: Float[Tensor, "n d_in"], is_letter: Tensor, letter: str, *,
    test_fraction: float = 0.3, cosine_threshold: float = COSINE_THRESHOLD, seed: int = 0,
) -> LetterAbsorption:
    """Absorption of one letter; `is_letter` (n,) marks the tokens that start with it."""
    labels = is_letter.long()
    train, test = split_indices(labels, test_fraction, seed)
    direction, probe = probe_direction(acts[train], labels[train], seed=seed)
    with torch.no_grad():
        latents = sae.encode(acts.float()).float()  # (n, d_sae)
    main = int(mean_difference_scores(latents[train], labels[train]).argmax())
    predicted = torch.from_numpy(probe.predict(acts[test].double().numpy())).bool()
    positives = test[predicted & labels[test].bool()]  # probe true positives
    silent = latents[positives, main] <= 0
    absorbers = _absorbers(sae, latents[positives], direction, main, cosine_threshold)
    absorbed = silent & (absorbers >= 0)
    counts = torch.bincount(absorbers[absorbed], minlength=1)
    return LetterAbsorption(letter, main, len(positives), int(silent.sum()), int(absorbed.sum()),
                            {int(j): int(counts[j]) for j in counts.nonzero()[:, 0]})


def _absorbers(sae, latents: Tensor, direction: Tensor, main: int, cosine_threshold: float) -> Tensor:
    """Per token: the active latent with the largest contribution to the probe projection if it is
    aligned with the probe and is not the main latent, else −1."""
    decoder = sae.W_dec.detach().float()  # (d_sae, d_in)
    projection = decoder @ direction  # (d_sae,)
    cosine = projection / decoder.norm(dim=1).clamp_min(1e-12)
    contribution = latents * projection  # (n, d_sae): a_j · (W_dec[j] · p)
    contribution = contribution.masked_fill(latents <= 0, float("-inf"))
    best = contribution.argmax(1)
    ok = (contribution.gather(1, best[:, None])[:, 0] > 0) & (cosine[best] >= cosine_threshold) & (best != main)
    return torch.where(ok, best, torch.full_like(best, -1))


def feature_absorption(
    sae, acts: Float[Tensor, "n d_in"], letters: Sequence[str], *,
    min_examples: int = 20, test_fraction: float = 0.3, cosine_threshold: float = COSINE_THRESHOLD, seed: int = 0,
) -> AbsorptionResult:
    """Absorption for every letter with at least `min_examples` tokens (see the module docstring);
    `letters[i]` is the first letter of the token whose activation is `acts[i]`."""
    _check(sae, acts, letters)
    labels = [letter.lower() for letter in letters]
    results = []
    for letter in sorted(set(labels)):
        is_letter = torch.tensor([x == letter for x in labels])
        if int(is_letter.sum()) < min_examples or int((~is_letter).sum()) < min_examples:
            continue
        results.append(letter_absorption(sae, acts, is_letter, letter, test_fraction=test_fraction,
                                         cosine_threshold=cosine_threshold, seed=seed))
    if not results:
        raise UserInputError(f"no letter has {min_examples} tokens or more; give more tokens or a smaller min_examples")
    return AbsorptionResult(results)


def _check(sae, acts: Tensor, letters: Sequence[str]) -> None:
    if acts.dim() != 2 or acts.shape[1] != sae.cfg.d_in:
        raise UserInputError(f"activations have shape {tuple(acts.shape)} but the SAE reads d_in={sae.cfg.d_in}; "
                             f"take them at the SAE's site ({sae.cfg.site or 'unknown'})")
    if len(letters) != acts.shape[0]:
        raise UserInputError(f"{acts.shape[0]} activation rows but {len(letters)} letters")
