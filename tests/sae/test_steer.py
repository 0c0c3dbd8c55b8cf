"""Steering with SAE features: steer, clamp, ablate, splice, the logit bias and their comparison."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

import interplab
from interplab.interventions import intervene
from interplab.sae.config import SAEConfig
from interplab.sae.model import SAE
from interplab.sae.steer import (
    FeatureLogitBias, ablate_feature, clamp_feature, compare_steering, decoder_direction, splice_sae,
    steer_feature, vocab_bias,
)
from tests.helpers import hook_count
from tests.tiny import tiny_model

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 96, (3, 12), generator=g)
    ids[:, 0] = 1
    return ids


def topk_sae(seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(d_in=32, d_sae=64, family="topk", k=6, site=SITE),
              generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.input_scale.fill_(3.0)
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


def invertible_relu_sae() -> SAE:
    """A ReLU SAE whose encoder inverts its decoder on the span of its (orthonormal) rows, so
    re-encoding x + c·d_i changes latent i by c (while it stays active) and no other latent."""
    sae = SAE(SAEConfig(d_in=32, d_sae=16, family="relu", site=SITE))
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        sae.W_dec.copy_(q[:16])
        sae.W_enc.copy_(q[:16].T)
        sae.b_enc.fill_(0.02)
        sae.b_dec.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        sae.input_scale.fill_(25.0)
    return sae


def site_acts(model, ids, fns=None):
    if fns is None:
        return interplab.capture(model, SITE, ids)[SITE]
    with intervene(model, {SITE: fns}):
        return interplab.capture(model, SITE, ids)[SITE]


def test_steer_adds_alpha_times_the_decoder_direction(llama, ids):
    sae = topk_sae()
    clean = site_acts(llama, ids)
    steered = site_acts(llama, ids, steer_feature(sae, 5, scale=4.0))
    expected = clean + 4.0 * sae.W_dec[5].detach() / 3.0
    torch.testing.assert_close(steered, expected)
    torch.testing.assert_close(decoder_direction(sae, 5), sae.W_dec[5].detach() / 3.0)
    last_only = site_acts(llama, ids, steer_feature(sae, 5, scale=4.0, positions=-1))
    torch.testing.assert_close(last_only[:, :-1], clean[:, :-1])
    torch.testing.assert_close(last_only[:, -1], expected[:, -1])


def test_clamp_with_error_term_changes_only_that_feature(llama, ids):
    sae = invertible_relu_sae()
    clean = site_acts(llama, ids)
    before = sae.encode(clean).detach()
    feature = int((before > 0).sum((0, 1)).argmax())  # the latent active on most tokens
    active = before[..., feature] > 0
    assert active.sum() >= 5
    value = float(before[..., feature][active].max()) * 3
    patched = site_acts(llama, ids, clamp_feature(sae, feature, value))
    after = sae.encode(patched).detach()
    others = [i for i in range(16) if i != feature]
    torch.testing.assert_close(after[..., others], before[..., others], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after[..., feature][active], torch.full_like(after[..., feature][active], value),
                               atol=1e-4, rtol=1e-4)
    ablated = sae.encode(site_acts(llama, ids, ablate_feature(sae, feature))).detach()
    torch.testing.assert_close(ablated[..., feature], torch.zeros_like(ablated[..., feature]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ablated[..., others], before[..., others], atol=1e-4, rtol=1e-4)


def test_clamp_moves_the_activation_along_one_direction_for_any_family(llama, ids):
    sae = topk_sae()
    clean = site_acts(llama, ids)
    f = sae.encode(clean).detach()
    patched = site_acts(llama, ids, clamp_feature(sae, 7, 2.5))
    expected = clean + (2.5 - f[..., 7:8]) * decoder_direction(sae, 7)
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)
    no_error = site_acts(llama, ids, clamp_feature(sae, 7, 2.5, keep_error=False))
    edited = f.clone()
    edited[..., 7] = 2.5
    torch.testing.assert_close(no_error, sae.decode(edited).detach(), atol=1e-5, rtol=1e-5)


def test_splice_with_error_term_reproduces_clean_logits(llama, ids):
    sae = topk_sae()
    with torch.no_grad():
        clean = llama.hf(input_ids=ids).logits
        with intervene(llama, {SITE: splice_sae(sae, keep_error=True)}):
            with_error = llama.hf(input_ids=ids).logits
        with intervene(llama, {SITE: splice_sae(sae)}):
            spliced = llama.hf(input_ids=ids).logits
    torch.testing.assert_close(with_error, clean, atol=1e-5, rtol=1e-5)
    assert (spliced - clean).abs().max() > 1e-3
    acts = site_acts(llama, ids, splice_sae(sae))
    torch.testing.assert_close(acts, sae.decode(sae.encode(site_acts(llama, ids))).detach(), atol=1e-5, rtol=1e-5)


def test_interventions_check_the_sae_against_the_site(llama):
    wide = SAE(SAEConfig(d_in=48, d_sae=64, family="topk", k=4, site=SITE))
    with pytest.raises(ValueError, match=r"d_in=48.*width 32"):
        intervene(llama, {SITE: steer_feature(wide, 0, scale=1.0)})
    assert hook_count(llama) == hook_count(tiny_model("llama"))  # nothing left behind
    with pytest.raises(ValueError, match="out of range"):
        intervene(llama, {SITE: clamp_feature(topk_sae(), 64, 1.0)})
    with pytest.raises(ValueError, match="finite"):
        intervene(llama, {SITE: steer_feature(topk_sae(), 1, scale=float("nan"))})
    with pytest.raises(ValueError, match=r"d_in=48.*width 32"):
        FeatureLogitBias(llama, wide, 0, scale=1.0)


def test_vocab_bias_is_the_folded_unembedding_of_the_decoder_row(llama):
    sae = topk_sae()
    gamma = llama.ln_final.weight.detach()
    effect = llama.unembed.weight.detach() @ (sae.W_dec[3].detach() * gamma)
    centred = effect - effect.mean()
    torch.testing.assert_close(vocab_bias(llama, sae, 3), centred / centred.max())
    unfolded = llama.unembed.weight.detach() @ sae.W_dec[3].detach()
    assert vocab_bias(llama, sae, 3, fold_norm=False).argmax() == (unfolded - unfolded.mean()).argmax()


@pytest.mark.parametrize("use_cache", [True, False])
def test_logit_bias_changes_the_distribution_only_through_the_bias(llama, use_cache):
    sae = topk_sae()
    prompts = torch.tensor([[1, 10, 11, 12, 13], [1, 20, 21, 22, 23], [1, 30, 31, 32, 33]])
    clean_cache = interplab.capture(llama, [SITE, "ln_final.hook_normalized"], prompts, logits=True)
    last = sae.encode(clean_cache[SITE][:, -1]).detach()
    feature = int(last.std(0).argmax())  # a latent that differs across the three prompts
    values = last[:, feature].sort().values
    threshold = float(values[1] + values[0]) / 2  # active on some rows, not on others
    active = last[:, feature] > threshold
    assert 0 < int(active.sum()) < 3
    bias = FeatureLogitBias(llama, sae, feature, scale=5.0, only_when_active=True, threshold=threshold)
    with bias:
        watched = interplab.capture(llama, [SITE, "ln_final.hook_normalized"], prompts, logits=True)
        out = llama.hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3,
                                do_sample=False, use_cache=use_cache, logits_processor=LogitsProcessorList([bias]),
                                output_scores=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    for name in (SITE, "ln_final.hook_normalized"):  # the residual stream is untouched
        assert torch.equal(watched[name], clean_cache[name])
    assert torch.equal(watched.logits, clean_cache.logits)
    torch.testing.assert_close(out.logits[0], clean_cache.logits[:, -1])  # raw logits are the clean ones
    expected = 5.0 * active[:, None].float() * vocab_bias(llama, sae, feature)
    torch.testing.assert_close(out.scores[0] - out.logits[0], expected, atol=1e-5, rtol=1e-5)
    for step in range(1, 3):  # later steps: the bias follows the latent on each new token
        difference = out.scores[step] - out.logits[step]
        assert all(torch.allclose(row, 5.0 * vocab_bias(llama, sae, feature), atol=1e-5) or
                   torch.allclose(row, torch.zeros_like(row)) for row in difference)
    assert hook_count(llama) == hook_count(tiny_model("llama"))


def test_logit_bias_always_on_and_with_generate(llama):
    sae = topk_sae()
    bias = FeatureLogitBias(llama, sae, 2, scale=50.0)
    target = int(vocab_bias(llama, sae, 2).argmax())
    text = interplab.generate(llama, ["the cat sat"], max_new_tokens=4, chat=False,
                              logits_processor=LogitsProcessorList([bias]))[0]
    assert text.split() == [llama.tokenizer.decode([target]).strip()] * 4
    watching = FeatureLogitBias(llama, sae, 2, scale=1.0, only_when_active=True)
    with pytest.raises(RuntimeError, match="with bias"):
        watching(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 96))


def test_compare_steering_reports_every_method(llama, ids):
    sae = topk_sae()
    prompts = ["the cat sat on", "a dog is", "the weather is"]
    comparison = compare_steering(llama, sae, 2, prompts, ids, scales=(1.0, 4.0), bias_scales=(1.0, 4.0, 16.0))
    methods = [r.method for r in comparison.results]
    assert methods == ["steer"] * 2 + ["clamp"] * 2 + ["logit_bias"] * 3 + ["logit_bias_active"] * 3
    bias_gains = [r.target_gain for r in comparison.results if r.method == "logit_bias"]
    assert 0 < bias_gains[0] < bias_gains[1] < bias_gains[2]  # tilting towards the targets raises their mass
    bias_damage = [r.damage for r in comparison.results if r.method == "logit_bias"]
    assert bias_damage[2] > bias_damage[0]
    assert len(comparison.target_tokens) == 10 and comparison.max_activation > 0
    for r in comparison.results:
        assert r.target_prob == pytest.approx(comparison.clean_target_prob + r.target_gain)
    with pytest.raises(ValueError, match="methods"):
        compare_steering(llama, sae, 2, prompts, ids, methods=["magic"])
