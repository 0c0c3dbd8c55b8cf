import copy

import pytest
import torch

from interplab.analysis import embedding_arithmetic, parse_expression, vocab_projection
from interplab.models.handle import LoadedModel
from tests.tiny import tiny_model


def test_parse_expression():
    assert parse_expression("king - man + woman") == [(1.0, "king"), (-1.0, "man"), (1.0, "woman")]
    assert parse_expression("2*king -0.5 * 'New York'") == [(2.0, "king"), (-0.5, "New York")]
    assert parse_expression("-a+b") == [(-1.0, "a"), (1.0, "b")]
    for bad in ("", "   ", "king man", "king + * man"):
        with pytest.raises(ValueError):
            parse_expression(bad)


@pytest.fixture(scope="module")
def analogy_model():
    """A copy of tiny llama whose embeddings make w1 - w2 + w3 = w4 exactly (king - man + woman = queen)."""
    base = tiny_model("llama")
    model = LoadedModel.wrap(copy.deepcopy(base.hf), base.tokenizer)
    tok = base.tokenizer
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("w1", "w2", "w3", "w4")}
    royal, male, female = torch.zeros(32), torch.zeros(32), torch.zeros(32)
    royal[0], male[1], female[2] = 3.0, 3.0, 3.0
    with torch.no_grad():
        weight = model.embed.weight
        weight[ids["w1"]] = royal + male
        weight[ids["w2"]] = male + 0.1 * royal
        weight[ids["w3"]] = female + 0.1 * royal
        weight[ids["w4"]] = royal + female
    return model


def test_king_minus_man_plus_woman(analogy_model):
    nearest = embedding_arithmetic(analogy_model, "w1 - w2 + w3", top_k=3)
    assert nearest[0][0] == "w4" and nearest[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(nearest) == 3 and nearest[0][1] >= nearest[1][1] >= nearest[2][1]
    with_inputs = embedding_arithmetic(analogy_model, "w1 + w4", top_k=2, exclude_inputs=False)
    assert {t for t, _ in with_inputs} == {"w1", "w4"}
    assert "w1" not in [t for t, _ in embedding_arithmetic(analogy_model, "w1 + w4", top_k=10)]


def test_multi_token_words(analogy_model):
    with pytest.raises(ValueError, match=r"' w1 w2' is 2 tokens.*multi_token='mean'"):
        embedding_arithmetic(analogy_model, "'w1 w2' + w3")
    mean = embedding_arithmetic(analogy_model, "'w1 w2' + w3", multi_token="mean", top_k=1, exclude_inputs=False)
    direct = embedding_arithmetic(analogy_model, "0.5*w1 + 0.5*w2 + w3", top_k=1, exclude_inputs=False)
    assert mean == direct
    with pytest.raises(ValueError, match="space must be"):
        embedding_arithmetic(analogy_model, "w1", space="both")


def test_vocab_projection_of_an_unembedding_row(llama):
    token = llama.tokenizer.convert_tokens_to_ids("cat")
    gain = torch.ones(32)  # tiny llama's final norm gain is 1 at init
    direction = llama.unembed.weight[token].detach() / gain
    result = vocab_projection(llama, direction, top_k=3)
    assert result["top"][0][0] == "cat"
    assert result["bottom"][0][1] < 0 < result["top"][0][1]
    flipped = vocab_projection(llama, -direction, top_k=3)
    assert flipped["bottom"][0][0] == "cat"

    class Steer:
        vector = direction

    assert vocab_projection(llama, Steer(), top_k=3)["top"][0][0] == "cat"
    with pytest.raises(ValueError, match=r"shape \(8,\).*d_model=32"):
        vocab_projection(llama, torch.ones(8))
    with pytest.raises(ValueError, match="non-zero"):
        vocab_projection(llama, torch.zeros(32))
