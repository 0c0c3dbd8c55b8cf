"""Automated interpretability of an SAE's features from its feature index (`interplab sae explain`).

Per feature, from the index built by `interplab sae features` (the SAE checked against the
digest the index records):

    shown      the top `n_shown` contexts (the explainer's evidence)
    positives  the next `n_scored` top contexts (held out from the explainer)
    negatives  `n_scored` windows drawn at random (seeded) from the index's other stored
               windows on which the feature is silent on every token; their activations are
               recomputed with the model and the SAE, the way the index computed them

Then `interpret` labels the feature and scores the label (detection and/or simulation).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interplab.errors import UserInputError
from interplab.sae.evals.autointerp import (
    DETECT_MAX_TOKENS, DETECT_PROMPT, EXPLAIN_MAX_TOKENS, EXPLAIN_PROMPT, Example, interpret,
)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureExamples:
    shown: list[Example]
    positives: list[Example]
    negatives: list[Example]


def check_features(index, features: Sequence[int]) -> None:
    """Refuse latents the index lacks, or that fired in fewer than 2 of its windows (one to show,
    one to score), before any work."""
    for feature in features:
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < index.d_sae:
            raise UserInputError(f"feature {feature!r} is out of range: the SAE has {index.d_sae} latents "
                                 f"(valid 0..{index.d_sae - 1})")
        n_top = len(index.top_contexts(feature))
        if n_top < 2:
            raise UserInputError(f"feature {feature} is active in {n_top} window(s) of the index {index.path}; "
                                 "explaining and scoring it needs at least 2 (choose another feature, or index "
                                 "more text)")


def check_model(model, sae, index) -> None:
    """Refuse a model the index was not built with: the SAE must fit the index's site, and the
    index's stored tokens must decode the same with this model's tokenizer (the negatives' token
    ids are fed to it)."""
    from interplab.sae.downstream import resolve_sae_site

    resolve_sae_site(model, sae, index.meta["site"])
    tokenizer, vocab = model.require_tokenizer(), index.vocab()
    sample = sorted(vocab)[:200]
    if any(i >= model.vocab_size or tokenizer.decode([i]) != vocab[i] for i in sample):
        raise UserInputError(f"the feature index {index.path} was built with another tokenizer than that of "
                             f"{model.model_id} (it was built on {index.meta.get('model_id')}); pass that model "
                             "with --model")


def feature_examples(model, sae, index, feature: int, *, n_shown: int, n_scored: int, seed: int) -> FeatureExamples:
    """The shown, held-out activating and non-activating examples of one feature (module docstring)."""
    top = index.top_contexts(feature)
    n_show = max(1, min(n_shown, len(top) - 1))  # keep at least one top context to score
    shown = [Example(list(c.tokens), list(c.acts)) for c in top[:n_show]]
    positives = [Example(list(c.tokens), list(c.acts)) for c in top[n_show:n_show + n_scored]]
    negatives = silent_windows(model, sae, index, feature, n_scored, seed, exclude={c.context for c in top})
    if not negatives:
        raise UserInputError(f"feature {feature} fires somewhere in every window stored in {index.path}; there is "
                             "no non-activating context to score its label against (index more text)")
    return FeatureExamples(shown, positives, negatives)


def silent_windows(model, sae, index, feature: int, n: int, seed: int, *, exclude: set[int],
                   batch_size: int = 16) -> list[Example]:
    """Up to `n` stored windows of the index (not in `exclude`) where `feature` is 0 on every token."""
    rows = index.db.execute("SELECT id, tokens FROM contexts ORDER BY id").fetchall()  # the index's stored windows
    candidates = [(i, json.loads(tokens)) for i, tokens in rows if i not in exclude]
    random.Random(seed).shuffle(candidates)
    vocab, found = index.vocab(), []
    for start in range(0, len(candidates), batch_size):
        batch = candidates[start:start + batch_size]
        acts = window_activations(model, sae, index, torch.tensor([ids for _, ids in batch]), feature)
        for (_, ids), row in zip(batch, acts):
            if float(row.max()) <= 0:
                found.append(Example([vocab[t] for t in ids], row.tolist()))
                if len(found) == n:
                    return found
    return found


def window_activations(model, sae, index, windows: torch.Tensor, feature: int) -> torch.Tensor:
    """(n, seq) activations of `feature` on token windows, as `build_feature_index` computes them:
    at the index's site, ReLU'd, zero on special tokens when the index skipped them."""
    from interplab.cache import capture
    from interplab.tokens import special_token_mask

    site = model.site(index.meta["site"]).name
    cache = capture(model, site, windows, batch_size=len(windows), device="cpu", dtype=torch.float32)
    x = cache[site]
    x = x.flatten(2) if x.dim() > 3 else x  # (n, seq, width)
    with torch.no_grad():
        acts = sae.encode(x)[..., feature].float().relu()  # (n, seq)
    if index.meta.get("skip_special_tokens", True):
        acts = acts * ~special_token_mask(model, windows)
    return acts


def explain_features(client, explainer: str, model, sae, index, features: Sequence[int], *, n_shown: int = 10,
                     n_scored: int = 5, detection: bool = True, simulation: bool = True, seed: int = 0,
                     progress: bool = False) -> dict:
    """Label and score `features`; a JSON-ready record of the labels, scores and settings."""
    from interplab.progress import progress as progress_items
    from interplab.sae.evals.simulation import SIMULATE_PROMPT

    check_features(index, features)
    check_model(model, sae, index)
    examples = {f: feature_examples(model, sae, index, f, n_shown=n_shown, n_scored=n_scored, seed=seed)
                for f in features}  # every refusal happens before the first request
    results = []
    for feature in progress_items(features, progress, desc="explaining", unit="feature"):
        got = examples[feature]
        result = interpret(client, explainer, feature, got.shown, got.positives, got.negatives,
                           detection=detection, simulation=simulation).to_dict()
        result.update(n_shown=len(got.shown), n_positives=len(got.positives), n_negatives=len(got.negatives))
        results.append(result)
    settings = {"explainer": explainer, "n_shown": n_shown, "n_scored": n_scored, "seed": seed,
                "detection": detection, "simulation": simulation, "temperature": 0.0,
                "max_tokens": {"explain": EXPLAIN_MAX_TOKENS, "detect": DETECT_MAX_TOKENS,
                               "simulate": "4 * tokens + 8"},
                "prompts": {"explain": EXPLAIN_PROMPT, "detect": DETECT_PROMPT, "simulate": SIMULATE_PROMPT}}
    return {"format_version": FORMAT_VERSION, "type": "interplab.autointerp", "model": model.model_id,
            "site": index.meta["site"], "index": str(index.path), "sae_digest": index.meta.get("sae_digest"),
            "settings": settings, "features": results}
