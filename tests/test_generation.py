import pytest
import torch

import interplab
from interplab import Positions, generate, intervene
from interplab.interventions import add_vector
from tests.helpers import BASELINE_HOOKS, hook_count
from tests.tiny import tiny_model

PROMPTS = ["the cat sat on the mat", "the dog is hot"]  # different lengths -> left padding


def _steer(model, positions, scale=8.0):
    torch.manual_seed(1)
    v = torch.randn(model.d_model)
    return intervene(model, {"blocks.1.hook_resid_post": add_vector(v, scale=scale, positions=positions)})


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", Positions.from_(-2), slice(1, 3),
                                       Positions.first(2), [0, 7]])
def test_steering_is_the_same_with_and_without_kv_cache(model_type, positions):
    model = tiny_model(model_type)
    outputs = {}
    for use_cache in (True, False):
        with _steer(model, positions):
            outputs[use_cache] = generate(model, PROMPTS, max_new_tokens=8, use_cache=use_cache)
    assert outputs[True] == outputs[False]
    assert hook_count(model) == BASELINE_HOOKS[model_type]


@pytest.mark.parametrize("positions", ["generated", Positions.first(2), Positions.from_(-1)])
def test_left_padded_batch_matches_rows_run_alone(positions):
    model = tiny_model("llama")
    with _steer(model, positions):
        batched = generate(model, PROMPTS, max_new_tokens=6)
    alone = []
    for prompt in PROMPTS:
        with _steer(model, positions):
            alone += generate(model, [prompt], max_new_tokens=6)
    assert batched == alone


def test_steering_changes_generation_and_generated_only_leaves_prompt_alone():
    model = tiny_model("llama")
    base = generate(model, PROMPTS, max_new_tokens=8)
    with _steer(model, "all"):
        assert generate(model, PROMPTS, max_new_tokens=8) != base
    # "generated" leaves every prompt activation untouched: the first new token's logits come
    # from the last prompt position, so the first generated word is unchanged.
    with _steer(model, "generated"):
        steered = generate(model, PROMPTS, max_new_tokens=8)
    assert [s.split()[0] for s in steered] == [b.split()[0] for b in base]


def test_prompt_positions_mask_uses_absolute_positions():
    model = tiny_model("llama")
    site = "blocks.0.hook_resid_post"
    ids = [[5, 6, 7, 8], [9, 10]]
    base = interplab.capture(model, site, ids, padding_side="left")
    v = torch.ones(model.d_model)
    with intervene(model, {site: add_vector(v, positions=0)}):
        got = interplab.capture(model, site, ids, padding_side="left")
    delta = (got.by_position(site) - base.by_position(site)).abs().sum(-1)  # (batch, pos)
    assert delta[0, 0] > 0 and delta[1, 0] > 0
    assert torch.all(delta[:, 1:] == 0)


def test_streaming_callback_receives_the_text():
    model = tiny_model("llama")
    chunks = []
    out = generate(model, PROMPTS[:1], max_new_tokens=5, stream=chunks.append)
    assert "".join(chunks).strip() == out[0].strip()


@pytest.mark.parametrize("prompts, match", [([], "no prompts"), ([""], "empty"), (["  "], "empty")])
def test_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model("llama"), prompts)


def test_second_prompt_in_one_block_gets_its_own_prompt_length():
    """Two different forward passes inside one `with`: positions relative to the prompt end
    (-1 = last prompt token) must follow each prompt, not the first one seen."""
    model = tiny_model("llama")
    site = "blocks.0.hook_resid_post"
    v = torch.ones(model.d_model)
    long_ids, short_ids = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    base = interplab.capture(model, site, short_ids)[site]
    with intervene(model, {site: add_vector(v, positions=Positions.at(-1))}):
        interplab.capture(model, site, long_ids)
        got = interplab.capture(model, site, short_ids)[site]
    delta = (got - base).abs().sum(-1)[0]
    assert delta[2] > 0 and torch.all(delta[:2] == 0)
