"""Next-token cross-entropy and KL, written once for steering, SAE and analysis measurements.

All take log-probabilities over the whole sequence, (batch, seq, vocab) in float32 (from
`log_probs(logits)`): position t predicts token t + 1.
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor


def log_probs(logits: Float[Tensor, "batch seq vocab"]) -> Float[Tensor, "batch seq vocab"]:
    """log softmax in float32 (half-precision logits would round small probabilities away)."""
    return logits.float().log_softmax(-1)


def next_token_nll(log_p: Float[Tensor, "batch seq vocab"], ids: Int[Tensor, "batch seq"]
                   ) -> Float[Tensor, "batch seq_minus_1"]:
    """-log p(ids[:, t + 1] | ids[:, :t + 1]) for t = 0 .. seq - 2 (nats)."""
    targets = ids[:, 1:].to(log_p.device)
    return -log_p[:, :-1].gather(-1, targets[..., None])[..., 0]


def kl_divergence(log_p: Float[Tensor, "*n vocab"], log_q: Float[Tensor, "*n vocab"]) -> Float[Tensor, "*n"]:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) per position (nats), from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def masked_mean(values: Tensor, mask: Bool[Tensor, "..."]) -> tuple[float, int]:
    """(sum of values where mask, number of such values): accumulate means over batches."""
    mask = mask.to(values.device)
    return float(values[mask].sum()), int(mask.sum())
