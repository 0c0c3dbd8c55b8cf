"""Small helpers shared by tests."""

from __future__ import annotations

import torch


def hook_count(model) -> int:
    """Forward (pre-)hooks registered anywhere in the HF model."""
    hf = getattr(model, "hf", model)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())


class _Baseline(dict):
    """Hooks HF itself keeps on a tiny model (transformers 5 records outputs with hooks)."""

    def __missing__(self, model_type):
        from tests.tiny import tiny_model

        self[model_type] = hook_count(tiny_model(model_type))
        return self[model_type]


BASELINE_HOOKS = _Baseline()


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model.hf(input_ids=ids, attention_mask=mask).logits


def random_ids(n=2, seq=7, seed=0, vocab=90):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq), generator=g)
