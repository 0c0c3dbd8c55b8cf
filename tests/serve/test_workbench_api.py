"""The page's routes return what the library computes: feature cards, search, the lens, A/B numbers."""

from __future__ import annotations

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow  # real models behind a real server


def get(server, path):
    r = httpx.get(server.url + path, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_feature_card_matches_the_index(server, ts_sae):
    from interplab.sae.features import FeatureIndex

    with FeatureIndex(ts_sae[1]) as index:
        feature = max(range(64), key=lambda f: index.summary(f).fire_count)
        card = get(server, f"/api/saes/ts/features/{feature}?contexts=3")
        assert card["label"] == index.summary(feature).label
        top = index.top_contexts(feature, 3)
        assert [c["tokens"] for c in card["contexts"]] == [c.tokens for c in top]
        assert card["contexts"][0]["acts"] == pytest.approx(top[0].acts)
        assert card["promoted"] == [list(p) for p in index.logit_effects(feature).promoted]
        assert card["histogram"]["counts"] == index.histogram(feature)[1]
        word = index.summary(feature).label.split("'")[1]
    hits = get(server, f"/api/saes/ts/features?q={word}")["data"]
    assert feature in [h["feature"] for h in hits]
    r = httpx.get(server.url + "/api/saes/ts/features/64", timeout=10)
    assert r.status_code == 400 and "64 latents" in r.json()["error"]["message"]


def test_lens_matches_logit_lens_and_attention_rows_sum_to_one(server, tinystories):
    from interplab.analysis.lens import logit_lens

    prompt = "Once upon a time, there was a girl"
    r = httpx.post(server.url + "/api/lens", json={"prompt": prompt, "layer": 1, "head": 3}, timeout=60).json()
    expected = logit_lens(tinystories, prompt, top_k=3)
    assert r["rows"] == expected.rows and r["tokens"] == expected.tokens[0]
    torch.testing.assert_close(torch.tensor(r["top_probs"]), expected.top_log_probs[0].exp().float(), atol=1e-5, rtol=0)
    pattern = torch.tensor(r["attention"]["pattern"])
    torch.testing.assert_close(pattern.sum(-1), torch.ones(len(r["tokens"])), atol=1e-4, rtol=0)
    assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))  # causal
    assert tinystories.hf.config._attn_implementation == "sdpa"  # switched back after the capture


def test_ab_numbers_match_the_library(smollm, tmp_path):
    from interplab.steering import evaluate
    from interplab.steering.datasets import read_caa
    from interplab.steering.vector import SteeringVector
    from tests.serve.conftest import start

    vector = SteeringVector({10: 3 * torch.randn(smollm.d_model, generator=torch.Generator().manual_seed(0))})
    vector.save(tmp_path / "vectors" / "r")
    running, state = start(smollm, vectors=str(tmp_path / "vectors"))
    try:
        dataset = sorted(state.datasets)[0]
        body = {"dataset": dataset, "steering": [{"vector": "r", "scale": 4.0}], "n_pairs": 4}
        r = httpx.post(running.url + "/api/ab", json=body, timeout=300)
        assert r.status_code == 200, r.text
        got = r.json()
        bad = httpx.post(running.url + "/api/ab", json={**body, "dataset": "nope"}, timeout=30)
        assert bad.status_code == 404 and dataset in bad.json()["error"]["message"]
    finally:
        running.stop()
    prompts = evaluate.ab_prompts(smollm, read_caa(state.datasets[dataset])[:4])
    base = evaluate.ab_scores(smollm, prompts)
    steered = evaluate.ab_scores(smollm, prompts, steer=(vector, 10, 4.0, "all"))
    assert got["baseline"]["p_match"] == pytest.approx(base[0], abs=1e-5)
    assert got["steered"]["p_match"] == pytest.approx(steered[0], abs=1e-5)
    assert got["steered"]["p_match"] != pytest.approx(base[0], abs=1e-3)
    damage = evaluate.damage(smollm, vector, layers=[10], scales=[4.0])[0]
    assert got["damage"] == pytest.approx(damage.delta_ce, abs=1e-4)
    assert got["kl"] == pytest.approx(damage.kl, abs=1e-4)
