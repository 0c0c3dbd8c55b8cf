"""Extraction: exact against direct captures; methods recover a planted direction."""

import pytest
import torch

import interplab
from interplab.steering.datasets import ContrastDataset, ContrastPair, actadd_pair, pairs_from_texts
from interplab.steering.extract import (METHODS, extract_vector, fit_direction, read_activations, separation,
                                        tokenize_completion)

TEXT_PAIRS = [("the cat sat on the mat", "the dog sat"), ("hot", "cold weather is a mat"),
              ("a dog is hot", "a cat is cold"), ("the weather", "the mat is on the cat ."),
              ("cold cold cold", "hot")]


def direct(model, text, site, span=None):
    acts = interplab.capture(model, site, text)[site][0]  # (seq, d), one text, no padding
    start, stop = span if span else (acts.shape[0] - 1, acts.shape[0])
    return acts[start:stop].mean(0)


def test_mean_diff_equals_direct_computation_last_token(llama):
    data = pairs_from_texts(TEXT_PAIRS)
    result = extract_vector(llama, data, layers=[0, 2], batch_size=3, holdout=0.0)
    for layer in (0, 2):
        site = f"blocks.{layer}.hook_resid_post"
        expected = torch.stack([direct(llama, p, site) - direct(llama, n, site) for p, n in TEXT_PAIRS]).mean(0)
        torch.testing.assert_close(result.vector[layer], expected, atol=1e-5, rtol=0)
    assert result.vector.method == "mean_diff" and result.vector.model_id == "tiny-llama"
    assert result.vector.settings["read"] == "last" and result.report == ()


def test_mean_read_averages_the_completion_tokens(llama):
    prompt = "the weather is"
    pairs = [(" hot .", " cold"), (" a hot mat", " the cold cat sat")]
    data = pairs_from_texts(pairs, prompt=prompt)
    vector = extract_vector(llama, data, layers=[1], read="mean", batch_size=4, holdout=0.0).vector
    site = "blocks.1.hook_resid_post"
    n_prompt = 3  # the word-level test tokenizer: one token per word

    def completion_mean(c):
        return direct(llama, prompt + c, site, span=(n_prompt, n_prompt + len(c.split())))

    expected = torch.stack([completion_mean(p) - completion_mean(n) for p, n in pairs]).mean(0)
    torch.testing.assert_close(vector[1], expected, atol=1e-5, rtol=0)


def test_read_activations_shapes_and_answer_token(llama):
    acts = read_activations(llama, pairs_from_texts(TEXT_PAIRS), layers=[0, 1, 2], read="last", batch_size=2)
    assert acts.positive.shape == (5, 3, 32) and acts.layers == (0, 1, 2)
    text = tokenize_completion(llama, "the cat", " (A)", read="answer", letter="A")
    assert text.span == (2, 3)


def planted(n=80, d=32, seed=0):
    """Pairs whose difference is a varying multiple of a unit direction u, plus noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    base = torch.randn(n, d, generator=g)
    base = base - 0.9 * (base @ u)[:, None] * u  # little shared variance along u itself
    strength = 1 + 2 * torch.rand(n, 1, generator=g)
    pos = base + strength * u + 0.3 * torch.randn(n, d, generator=g)
    neg = base - strength * u + 0.3 * torch.randn(n, d, generator=g)
    return pos, neg, u


@pytest.mark.parametrize("method", METHODS)
def test_methods_recover_and_separate_a_planted_direction(method):
    pos, neg, u = planted()
    direction = fit_direction(pos[:60], neg[:60], method=method)
    cosine = float(direction @ u / direction.norm())
    assert cosine > 0.9, f"{method}: cos(direction, planted) = {cosine:.3f}"
    accuracy, pair_accuracy = separation(direction, pos[:60], neg[:60], pos[60:], neg[60:])
    assert accuracy >= 0.9 and pair_accuracy == 1.0
    # scaled to the mean difference's component along the unit direction
    mean = (pos[:60] - neg[:60]).mean(0)
    assert float(direction.norm()) == pytest.approx(abs(float(mean @ direction / direction.norm())), rel=1e-4)


def test_random_directions_do_not_separate():
    pos, neg, _ = planted(seed=1)
    noise = torch.randn(32, generator=torch.Generator().manual_seed(5))
    noise = noise - (noise @ planted(seed=1)[2]) * planted(seed=1)[2]  # orthogonal to the planted one
    accuracy, _ = separation(noise, pos[:60], neg[:60], pos[60:], neg[60:])
    assert accuracy < 0.8


def test_report_has_a_score_per_layer(llama):
    data = pairs_from_texts(TEXT_PAIRS * 2)
    result = extract_vector(llama, data, layers=[0, 2], method="logistic", holdout=0.3, batch_size=4)
    assert [s.layer for s in result.report] == [0, 2]
    assert all(0 <= s.accuracy <= 1 and s.n_test == 3 and s.n_train == 7 for s in result.report)
    assert result.best_layer() in (0, 2)


def test_actadd_vector_is_the_position_aligned_difference(llama):
    result = extract_vector(llama, actadd_pair("hot weather", "cold"), layers=[1])
    v = result.vector
    assert v.position_aligned and v[1].shape == (2, 32) and v.method == "actadd"
    site = "blocks.1.hook_resid_post"
    pos = interplab.capture(llama, site, "hot weather")[site][0]
    neg = interplab.capture(llama, site, "cold  ")[site][0]  # padded with the space token...
    assert torch.allclose(v[1][0], pos[0] - neg[0], atol=1e-5)


def test_bad_input_fails_before_any_forward(llama):
    data = pairs_from_texts(TEXT_PAIRS)
    with pytest.raises(ValueError, match="layer 3 is out of range.*3 blocks"):
        extract_vector(llama, data, layers=[3])
    with pytest.raises(ValueError, match="unknown method 'median'"):
        extract_vector(llama, data, method="median")
    with pytest.raises(ValueError, match="read='answer' needs A/B completions"):
        extract_vector(llama, data, read="answer")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        extract_vector(llama, data, batch_size=0)
    with pytest.raises(ValueError, match="holdout"):
        extract_vector(llama, data, holdout=1.0)
    with pytest.raises(ValueError, match="needs at least 2 pairs"):
        extract_vector(llama, data[:1], method="pca_diff")
    with pytest.raises(TypeError, match="ContrastDataset"):
        extract_vector(llama, [("a", "b")])


def test_ab_pairs_read_the_answer_letter_by_default(llama):
    data = ContrastDataset((ContrastPair("(A)", "(B)", "the cat"), ContrastPair("(B)", "(A)", "the dog")), kind="ab")
    result = extract_vector(llama, data, layers=[0], holdout=0.0)
    assert result.vector.settings["read"] == "answer"
