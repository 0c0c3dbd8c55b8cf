"""Tiny random-init HF models of every architecture interplab's table covers, built from configs
(no download). Each has a small word-level tokenizer so texts work too."""

from __future__ import annotations

from functools import lru_cache

import torch

ARCH_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
              "olmo2", "gpt2", "gpt_neo", "gpt_neox")

#: the fast suite's representative architectures: soft-capped logits and extra norms (gemma2), blocks
#: that return tuples and GPT-style module names (gpt_neo), parallel attention and MLP (gpt_neox);
#: the `llama` fixture covers the common Llama layout. All 12 run under the `archs` marker (and in CI).
FAST_ARCH_TYPES = ("gemma2", "gpt_neo", "gpt_neox")

VOCAB = 96
_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GPT_SIZES = dict(n_embd=32, n_layer=3, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)


def arch_params() -> list:
    """ARCH_TYPES as pytest params: all marked `archs`; those outside FAST_ARCH_TYPES also `slow`,
    so `-m "not slow"` runs three architectures and the full run (and `-m archs`) all twelve."""
    import pytest

    return [pytest.param(t, id=t, marks=[pytest.mark.archs] + ([] if t in FAST_ARCH_TYPES else [pytest.mark.slow]))
            for t in ARCH_TYPES]


def tiny_config(model_type: str):
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", **_GPT_SIZES)
    if model_type == "gpt_neo":
        return AutoConfig.for_model("gpt_neo", hidden_size=32, num_layers=3, num_heads=4,
                                    intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                    attention_types=[[["global", "local"], 1], [["global"], 1]],
                                    window_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
                                    max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)
    sizes = dict(_SIZES)
    if model_type in ("gemma2", "gemma3_text"):
        sizes.update(sliding_window=8, query_pre_attn_scalar=8)
    if model_type == "gemma3_text":
        sizes.update(layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return AutoConfig.for_model(model_type, **sizes)


def word_tokenizer():
    """A real `PreTrainedTokenizerFast` over a small word vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4 - 12)] + [
        "the", "cat", "dog", "sat", "on", "mat", "hot", "cold", "weather", "is", "a", "."]
    vocab = {w: i for i, w in enumerate(words[:VOCAB])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    return tok


@lru_cache(maxsize=None)
def tiny_model(model_type: str, seed: int = 0, attn_implementation: str = "eager"):
    """A LoadedModel around a random-init tiny model (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    from interplab.models.handle import LoadedModel

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    config._attn_implementation = attn_implementation
    hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    # transformers 5 adds its own output-recording hooks on the first call that asks for hidden
    # states or attentions; make that call now so hook counts in tests do not depend on order.
    with torch.no_grad():
        hf(input_ids=torch.tensor([[3, 4]]), output_hidden_states=True, output_attentions=True)
    handle = LoadedModel.wrap(hf, word_tokenizer())
    handle.name = f"tiny-{model_type}"
    return handle
