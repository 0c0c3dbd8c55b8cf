"""The default model, end to end (slow: loads SmolLM2-135M-Instruct)."""

import pytest
import torch

import interplab
from interplab import Positions, intervene
from interplab.interventions import add_vector
from tests.helpers import hook_count

pytestmark = pytest.mark.slow

PROMPT = "The weather in California is"


def test_capture_matches_hf_hidden_states(smollm):
    ids = smollm.tokenizer([PROMPT, "Hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = smollm.hf(**ids, output_hidden_states=True).hidden_states
    sites = [f"blocks.{i}.hook_resid_post" for i in range(smollm.n_layers)]
    cache = interplab.capture(smollm, sites, ids)
    for i in range(smollm.n_layers - 1):
        torch.testing.assert_close(cache[sites[i]], hidden[i + 1], atol=1e-5, rtol=0)
    z = interplab.capture(smollm, "blocks.3.attn.hook_z", ids)["blocks.3.attn.hook_z"]
    assert z.shape[-2:] == (smollm.n_heads, smollm.d_head) == (9, 64)


def test_generate_and_steered_generation_differs(smollm):
    before = hook_count(smollm)
    base = interplab.generate(smollm, PROMPT, max_new_tokens=12)
    assert isinstance(base[0], str) and len(base[0].split()) >= 3
    # a direction read off the model itself: the residual of a contrasting word, scaled up
    cache = interplab.capture(smollm, "blocks.12.hook_resid_post", ["cold snow ice", "hot sun heat"])
    v = cache["blocks.12.hook_resid_post"][0, -1] - cache["blocks.12.hook_resid_post"][1, -1]
    with intervene(smollm, {"blocks.12.hook_resid_post": add_vector(v, scale=4.0, positions=Positions.from_(-1))}):
        steered = interplab.generate(smollm, PROMPT, max_new_tokens=12)
    assert steered != base
    assert hook_count(smollm) == before
    with intervene(smollm, {"blocks.12.hook_resid_post": add_vector(v, scale=4.0, positions="generated")}):
        cached = interplab.generate(smollm, PROMPT, max_new_tokens=8, use_cache=True)
        uncached = interplab.generate(smollm, PROMPT, max_new_tokens=8, use_cache=False)
    assert cached == uncached
