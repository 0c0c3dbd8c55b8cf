"""The attention view: one head's pattern equals HF's eager attention weights; it renders as HTML."""

import pytest
import torch

from interplab.analysis import attention_pattern
from tests.tiny import tiny_model


def test_pattern_equals_hf_attention_weights_and_renders():
    model = tiny_model("llama")
    prompt = "the cat sat on the mat"
    result = attention_pattern(model, prompt, layer=1, head=2)
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    before = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            expected = model.hf(ids, output_attentions=True).attentions[1][0, 2]
    finally:
        model.hf.set_attn_implementation(before)
    torch.testing.assert_close(result.pattern, expected.float())
    assert torch.allclose(result.pattern.sum(-1), torch.ones(len(result.tokens)))
    assert torch.all(result.pattern.triu(1) == 0)                      # causal
    page = result._repr_html_()
    assert page.count("<tr>") == len(result.tokens) + 1 and "L1H2" in page and "L1H2" in repr(result)


def test_out_of_range_head_and_layer_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="head 99 is out of range"):
        attention_pattern(model, "hi", layer=0, head=99)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        attention_pattern(model, "hi", layer=7, head=0)
