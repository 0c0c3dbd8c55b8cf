"""Direct tests of `interplab.tokens`: padded batches and the context-window check."""

import pytest
import torch

import interplab
from interplab.tokens import check_context, max_positions, pad_token_id, to_batch
from tests.helpers import BASELINE_HOOKS, hook_count
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_texts_are_padded_on_the_requested_side(model):
    right = to_batch(model, ["the cat sat", "a dog"], side="right")
    left = to_batch(model, ["the cat sat", "a dog"], side="left")
    assert right.attention_mask.tolist()[1][-1] == 0 and left.attention_mask.tolist()[1][0] == 0
    # the same real tokens either way
    assert right.input_ids[1][right.attention_mask[1].bool()].tolist() == \
        left.input_ids[1][left.attention_mask[1].bool()].tolist()
    assert model.tokenizer.padding_side == "right"  # restored


def test_id_lists_are_padded_with_the_pad_token(model):
    batch = to_batch(model, [[5, 6, 7], [8]], side="left")
    pad = pad_token_id(model)
    assert batch.input_ids.tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert len(batch) == 2 and batch.slice(1, 2).input_ids.tolist() == [[pad, pad, 8]]


def test_tensor_input_and_tokenizer_output(model):
    batch = to_batch(model, torch.tensor([5, 6, 7]))
    assert batch.input_ids.shape == (1, 3) and batch.attention_mask.tolist() == [[1, 1, 1]]
    enc = {"input_ids": [[5, 6]], "attention_mask": [[1, 1]]}
    assert to_batch(model, enc).input_ids.tolist() == [[5, 6]]


@pytest.mark.parametrize("inputs, match", [
    ([], "no inputs"),
    (["the cat", ""], "text 1 is empty"),
    ([[5, 6], []], "no tokens"),
    ([[5, 500]], r"token ids must lie in 0\.\.95"),
    (torch.tensor([[-1, 5]]), r"token ids must lie in 0\.\.95"),
    ([1.5], "inputs must be"),
])
def test_bad_inputs_are_refused(model, inputs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        to_batch(model, inputs)


def test_padding_side_is_checked(model):
    with pytest.raises(ValueError, match="padding side"):
        to_batch(model, "the cat", side="middle")


def test_context_check_counts_new_tokens(model):
    limit = max_positions(model)
    assert limit == 64
    check_context(model, 64)
    check_context(model, 60, new_tokens=4)
    with pytest.raises(ValueError, match=r"65 tokens, but tiny-llama allows at most 64 positions"):
        check_context(model, 65)
    with pytest.raises(ValueError, match=r"60 tokens \+ 5 new tokens = 65"):
        check_context(model, 60, new_tokens=5)


def test_capture_and_batches_refuse_inputs_past_the_window(model):
    with pytest.raises(ValueError, match="allows at most 64"):
        interplab.capture(model, "blocks.0.hook_resid_post", [[5] * 65])
    with pytest.raises(ValueError, match="allows at most 64"):
        to_batch(model, " ".join(["cat"] * 70))


def test_generate_refuses_a_prompt_that_would_run_past_the_window(model, monkeypatch):
    prompt = " ".join(["cat"] * 60)  # 60 tokens (+ BOS, if the tokenizer adds one)
    calls = []
    monkeypatch.setattr(model.hf, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"the prompts: \d+ tokens \+ 10 new tokens = \d+, but tiny-llama allows at most 64"):
        interplab.generate(model, prompt, max_new_tokens=10, chat=False)
    assert calls == [] and hook_count(model) == BASELINE_HOOKS["llama"]
    monkeypatch.undo()
    assert len(interplab.generate(model, prompt, max_new_tokens=2, chat=False)) == 1


def test_sae_windows_use_the_same_check(model):
    from interplab.sae.store import check_context_length

    check_context_length(model, 64)
    with pytest.raises(ValueError, match="windows: 65 tokens, but tiny-llama allows at most 64"):
        check_context_length(model, 65)
