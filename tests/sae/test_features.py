"""Feature index (top contexts, histograms, density, logit effects, labels, search), inspect,
contrast and the HTML card."""

from __future__ import annotations

import pytest
import torch

from interplab.sae.card import write_feature_card
from interplab.sae.config import SAEConfig
from interplab.sae.features import (
    FeatureIndex, FeatureStats, auto_label, build_feature_index, contrast, feature_vocab_effect, inspect,
)
from interplab.sae.model import SAE
from interplab.sae.store import Harvester
from tests.tiny import tiny_model

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sae():
    model = SAE(SAEConfig(d_in=32, d_sae=48, family="topk", k=6, site=SITE),
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.input_scale.fill_(4.0)
    return model


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 96, (40, 16), generator=g)
    ids[:, 0] = 1
    return ids


@pytest.fixture(scope="module")
def latents(llama, sae, windows):
    """Brute force: every window's latent activations, zero on BOS."""
    x = Harvester(llama, [SITE], drop_special_tokens=False).run(windows, 0).acts[SITE].view(*windows.shape, -1)
    return sae.encode(x).detach() * (windows != 1)[..., None]


@pytest.fixture(scope="module")
def index(llama, sae, windows, tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "features.db"
    return build_feature_index(llama, sae, windows, path, n_top=5, n_bins=8, batch_size=7)


def test_top_contexts_are_the_windows_with_the_largest_maximum(index, latents):
    window_max = latents.max(dim=1).values  # (n, d_sae)
    checked = 0
    for feature in range(latents.shape[-1]):
        values = window_max[:, feature].sort(descending=True).values
        expected = [float(v) for v in values[:5] if v > 0]
        got = index.top_contexts(feature)
        assert [c.activation for c in got] == pytest.approx(expected, rel=1e-5)  # windows may tie
        assert len({c.context for c in got}) == len(got)
        for c in got:
            assert c.activation == pytest.approx(float(window_max[c.context, feature]), rel=1e-5)
            torch.testing.assert_close(torch.tensor(c.acts), latents[c.context, :, feature].half().float())
            assert c.acts[c.max_pos] == max(c.acts)
            assert len(c.tokens) == 16
        checked += bool(expected)
    assert checked > 20


def test_density_histogram_and_means(index, latents):
    n_tokens = int((latents.sum(-1) != 0).numel() - latents.shape[0])  # every token but BOS
    flat = latents.reshape(-1, latents.shape[-1])
    for feature in range(latents.shape[-1]):
        summary = index.summary(feature)
        active = flat[:, feature][flat[:, feature] > 0]
        assert summary.fire_count == active.numel()
        assert summary.density == pytest.approx(active.numel() / n_tokens)
        edges, counts = index.histogram(feature)
        assert sum(counts) == active.numel() and len(counts) == 8
        if active.numel():
            assert summary.mean_act == pytest.approx(float(active.mean()), rel=1e-4)
            assert edges[-1] > float(active.max())
            bins = (active / edges[-1] * 8).long().clamp(max=7)
            expected = torch.bincount(bins, minlength=8)
            assert expected.tolist() == counts


def test_histogram_bins_merge_when_the_range_doubles():
    stats = FeatureStats(1, 1, n_top=1, n_bins=4)
    keep = torch.ones(1, 1, dtype=torch.bool)
    for value in (0.0, 1.0, 0.3, 0.6, 0.0, 3.5, 0.1):  # zeros: batches where it does not fire
        stats.update(torch.tensor([[[value]]]), keep, torch.tensor([0]))
    assert float(stats.hist_max[0]) == pytest.approx(4.04)  # 1.01 -> 2.02 -> 4.04
    assert stats.hist[0].tolist() == [4, 0, 0, 1]  # 0.1, 0.3, 0.6, 1.0 in [0, 1.01); 3.5 in [3.03, 4.04)
    assert int(stats.fire_count[0]) == 5 and stats.n_tokens == 7


def test_logit_effects_and_labels(index, llama, sae):
    effects = index.logit_effects(3)
    full = feature_vocab_effect(llama, sae, 3)
    top = full.topk(10)
    assert [t for t, _ in effects.promoted] == [llama.tokenizer.decode([int(i)]) for i in top.indices]
    assert [v for _, v in effects.promoted] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert effects.suppressed[0][1] == pytest.approx(float(full.min()), rel=1e-5)
    assert effects.fold_norm
    label = index.summary(3).label
    assert label.startswith("fires on ") and "promotes " in label
    assert auto_label(["rain", " rain", "storm"], ["wet"]) == "fires on 'rain' 'storm' | promotes 'wet'"


def test_search_finds_labels_and_contexts(index):
    label = index.summary(5).label
    token = label.split("'")[1]  # the first token it fires on
    hits = index.search(token)
    assert 5 in [h.feature for h in hits if h.score >= 5]  # an exact label token scores 5
    assert hits[0].score >= 5 and hits[0].matched == "label"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert index.search("no such token anywhere") == []
    with pytest.raises(ValueError, match="empty"):
        index.search("  ")
    with pytest.raises(ValueError, match="out of range"):
        index.summary(48)


def test_inspect_lists_the_strongest_latents_per_token(llama, sae):
    text = "the cat sat on the mat"
    result = inspect(llama, sae, text, k=3)
    ids = llama.tokenizer(text, return_tensors="pt")["input_ids"]
    x = Harvester(llama, [SITE], drop_special_tokens=False).run(ids, 0).acts[SITE]
    acts = sae.encode(x).detach()
    assert [t.token for t in result] == text.split()
    assert inspect(llama, sae, "<s> the cat", k=2)[0].features == []  # BOS is listed without latents
    for pos, token in enumerate(result):
        top = acts[pos].topk(3)
        assert [f for f, _ in token.features] == top.indices.tolist()
        assert [v for _, v in token.features] == pytest.approx(top.values.tolist(), rel=1e-5)


def test_contrast_ranks_latents_by_mean_difference(llama, sae):
    a, b = ["the cat sat on the mat", "the dog sat"], ["w1 w2 w3 w4", "w5 w6 w7"]
    result = contrast(llama, sae, a, b, k=4)

    def set_mean(texts):
        means = []
        for text in texts:
            ids = llama.tokenizer(text, return_tensors="pt")["input_ids"]
            x = Harvester(llama, [SITE], drop_special_tokens=False).run(ids, 0).acts[SITE]
            means.append(sae.encode(x).detach().mean(0))
        return torch.stack(means).mean(0)

    diff = set_mean(a) - set_mean(b)
    assert [r.feature for r in result[:4]] == diff.topk(4).indices.tolist()
    assert [r.feature for r in result[4:]] == (-diff).topk(4).indices.tolist()
    assert result[0].difference == pytest.approx(float(diff.max()), rel=1e-5)
    with pytest.raises(ValueError, match="texts_b"):
        contrast(llama, sae, a, [])


def test_card_is_self_contained_html(index, tmp_path):
    path = write_feature_card(index, 5, tmp_path / "card" / "f5.html")
    page = path.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "Feature 5" in page
    summary = index.summary(5)
    assert summary.label.split("'")[1] in page
    assert "promoted" in page and "suppressed" in page and "folded in" in page
    top = index.top_contexts(5, 1)[0]
    assert top.tokens[top.max_pos] in page
    assert "<s>" not in page  # tokens are escaped


def test_index_is_replaced_atomically_and_checked(llama, sae, windows, tmp_path):
    path = tmp_path / "f.db"
    build_feature_index(llama, sae, windows[:10], path, n_top=2, n_bins=4).close()
    with FeatureIndex(path) as first:
        assert first.meta["n_contexts"] == 10
    build_feature_index(llama, sae, windows[:20], path, n_top=2, n_bins=4).close()
    with FeatureIndex(path) as second:
        assert second.meta["n_contexts"] == 20 and second.meta["site"] == SITE
    assert [p.name for p in tmp_path.iterdir()] == ["f.db"]  # no temporary files left
    (tmp_path / "junk.db").write_text("not sqlite")
    with pytest.raises(ValueError, match="not an interplab feature index"):
        FeatureIndex(tmp_path / "junk.db")
    with pytest.raises(ValueError, match="does not exist"):
        FeatureIndex(tmp_path / "missing.db")
    wide = SAE(SAEConfig(d_in=64, d_sae=8, family="topk", k=2, site=SITE))
    with pytest.raises(ValueError, match=r"d_in=64.*width 32"):
        build_feature_index(llama, wide, windows, tmp_path / "w.db")


# --- the index knows its SAE; search and paths are literal (issue #11) ---------------------------

def test_index_refuses_another_sae_naming_both(index, sae):
    with FeatureIndex(index.path, sae=sae) as same:  # the SAE it was built from
        assert same.meta["sae_digest"].startswith("sha256:")
    other = SAE(SAEConfig(d_in=32, d_sae=48, family="topk", k=6, site=SITE),
                generator=torch.Generator().manual_seed(1))  # same shape, other weights
    with pytest.raises(ValueError, match=r"built from .*not from this SAE.*weights digest"):
        FeatureIndex(index.path, sae=other)
    bigger = SAE(SAEConfig(d_in=32, d_sae=96, family="topk", k=6, site="blocks.0.hook_resid_post"))
    with pytest.raises(ValueError, match=r"d_sae 48 there, 96 here; site blocks.1.hook_resid_post there, "
                                         r"blocks.0.hook_resid_post here"):
        index.check_sae(bigger)


def test_search_treats_percent_and_underscore_literally(index):
    assert index.search("%") == [] and index.search("_") == []
    label = next(s.label for s in map(index.summary, range(index.d_sae)) if s.label)
    word = label.split("'")[1]
    assert index.search(word)  # a real word still matches
    if len(word) > 1:
        assert all(h.matched != "label" or word[0] + "_" not in h.label for h in index.search(word[0] + "_"))


def test_index_paths_with_uri_characters_work_and_create_nothing(llama, sae, windows, tmp_path):
    name = "a#b?c 100% naïve→.db"  # '#', '?', '%', a space and non-ASCII: all URI syntax if pasted raw
    folder = tmp_path / "idx dir#1"
    path = folder / name
    build_feature_index(llama, sae, windows[:6], path, n_top=2, n_bins=4).close()
    with FeatureIndex(path) as opened:
        assert opened.meta["n_contexts"] == 6 and opened.summary(0).feature == 0
    assert [p.name for p in folder.iterdir()] == [name]
    assert [p.name for p in tmp_path.iterdir()] == ["idx dir#1"]
