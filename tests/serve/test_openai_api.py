"""The official `openai` client against a real server (TinyStories-656K on a free loopback port)."""

from __future__ import annotations

import pytest
import torch

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a real model behind a real server

PROMPT = "Once upon a time, there was a little dog named"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, steering=None, **kwargs):
    extra = {"steering": steering} if steering else None
    params = dict(model="tinystories", messages=[{"role": "user", "content": PROMPT}], max_tokens=16,
                  temperature=0)
    params.update(kwargs)
    return client.chat.completions.create(**params, extra_body=extra)


def test_models_lists_the_served_model(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server.state.model_name]


def test_plain_chat_matches_library_generate(client, tinystories):
    import interplab

    reply = chat(client)
    expected = interplab.generate(tinystories, PROMPT, max_new_tokens=16, chat=False)[0]
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(tinystories.tokenizer(PROMPT)["input_ids"])
    assert reply.usage.prompt_tokens == n_prompt
    assert reply.usage.completion_tokens == 16
    assert reply.usage.total_tokens == n_prompt + 16


def test_streamed_chat_gives_the_same_text_in_pieces(client):
    plain = chat(client).choices[0].message.content
    pieces, finishes = [], []
    for chunk in chat(client, stream=True):
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == plain
    assert sum(1 for p in pieces if p) > 3  # really streamed, not one blob
    assert finishes[-1] in ("length", "stop") and all(f is None for f in finishes[:-1])


def test_steered_chat_differs_and_matches_the_library_vector(client, tinystories, vectors_dir):
    import interplab
    from interplab.steering.vector import load_vector

    plain = chat(client).choices[0].message.content
    steering = [{"vector": "happy", "layers": [0], "scale": 8.0}]
    steered = chat(client, steering).choices[0].message.content
    assert steered != plain
    with load_vector(vectors_dir / "happy").apply(tinystories, layers=[0], scale=8.0):
        expected = interplab.generate(tinystories, PROMPT, max_new_tokens=16, chat=False)[0]
    assert steered == expected


def test_raw_float_vector_equals_the_same_registered_vector(client, vectors_dir):
    from interplab.steering.vector import load_vector

    raw = load_vector(vectors_dir / "sad")[1].tolist()
    by_name = chat(client, [{"vector": "sad", "layers": [1], "scale": 6.0, "positions": "generated"}])
    by_value = chat(client, [{"vector": raw, "layers": [1], "scale": 6.0, "positions": "generated"}])
    assert by_name.choices[0].message.content == by_value.choices[0].message.content


def test_completions_endpoint_with_stop_string(client, tinystories):
    import interplab

    full = interplab.generate(tinystories, PROMPT, max_new_tokens=20, chat=False)[0]
    stop = full.split()[2]
    reply = client.completions.create(model="x", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_repeatable_and_seed_dependent(client):
    a = [chat(client, temperature=1.0, seed=s, max_tokens=20).choices[0].message.content for s in (1, 1, 2)]
    assert a[0] == a[1]
    assert a[0] != a[2]


def test_feature_logit_bias_raises_the_features_top_tokens(client, server, tinystories):
    """The first token under a logit bias is the argmax of HF's logits + value * b_i; the bias multiplies
    the probability of the latent's top tokens, and the completion holds more of them."""
    from interplab.sae.steer import FeatureLogitBias

    entry = server.state.saes.entries["ts"]
    feature = 3
    bias = FeatureLogitBias(tinystories, entry.sae, feature, scale=10.0)
    top = set(bias.bias.topk(20).indices.tolist())
    ids = tinystories.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tinystories.hf(input_ids=ids).logits[0, -1].float()
    steering = [{"sae": "ts", "feature": feature, "mode": "logit_bias", "value": 10.0}]

    def complete(n, steering=None):
        reply = client.completions.create(model="x", prompt=PROMPT, max_tokens=n, temperature=0,
                                          extra_body={"steering": steering} if steering else None)
        return reply.choices[0].text

    expected_first = tinystories.tokenizer.decode([int(bias.apply_to_logits(logits).argmax())])
    assert complete(1, steering) == expected_first
    p_top = lambda lg: float(lg.softmax(-1)[list(top)].sum())  # noqa: E731
    assert p_top(bias.apply_to_logits(logits)) > 20 * p_top(logits)

    def share(text):
        pieces = tinystories.tokenizer(text, add_special_tokens=False)["input_ids"]
        return sum(i in top for i in pieces) / max(len(pieces), 1)

    assert share(complete(24, steering)) >= share(complete(24)) + 0.15


def test_sae_feature_edits_change_the_text(client):
    plain = chat(client).choices[0].message.content
    added = chat(client, [{"sae": "ts", "feature": 5, "mode": "add", "value": 40.0}]).choices[0].message.content
    assert added != plain
    # ablating a latent keeps the SAE's error term: text may stay the same, but it must run
    chat(client, [{"sae": "ts", "feature": 5, "mode": "ablate"}])
    chat(client, [{"sae": "ts", "feature": 5, "mode": "clamp", "value": 3.0}])
