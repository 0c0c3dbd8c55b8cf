"""Attribution graphs on a tiny random Llama with random transcoders: exactness of the
replacement model, completeness, batched == one target per pass, pruning, JSON and HTML."""

from __future__ import annotations

import json

import pytest
import torch

from interplab.errors import UserInputError
from interplab.graph.attribution import attribute
from interplab.graph.check import measured_change
from interplab.graph.html import write_graph_html
from interplab.graph.prune import node_influence, prune
from interplab.sae.transcoder import Transcoder, TranscoderConfig
from tests.tiny import tiny_model

IDS = torch.tensor([1, 5, 6, 7, 8, 9, 10])


def _transcoders(layers=(0, 2)):
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in layers:
        tc = Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=64, layer=layer, k=4, skip=layer == 2), generator=g)
        with torch.no_grad():  # non-zero biases and skip weights, so every term is exercised
            tc.b_enc.normal_(generator=g)
            tc.b_dec.normal_(generator=g)
            if tc.cfg.skip:
                tc.W_skip.normal_(0, 0.2, generator=g)
        out[layer] = tc.eval()
    return out


@pytest.fixture(scope="module")
def graph():
    return attribute(tiny_model("llama"), _transcoders(), IDS, batch_size=16)


def test_completeness_every_target_is_the_sum_of_its_inputs(graph):
    """value_t = Σ_s A[t, s] + bias_t for every feature and the logit (layer 1 has no transcoder:
    its MLP is only error nodes)."""
    targets = [i for i, n in enumerate(graph.nodes) if n["kind"] in ("feature", "logit")]
    values, biases = graph.values()[targets], graph.biases()[targets]
    recomposed = graph.adjacency.double()[targets].sum(1) + biases
    torch.testing.assert_close(recomposed, values, rtol=1e-4, atol=1e-4)
    assert graph.nodes[-1]["value"] == pytest.approx(graph.target["value"])
    assert biases.abs().max() > 0.1  # the bias terms are really there
    assert {n["layer"] for n in graph.nodes if n["kind"] == "feature"} == {0, 2}
    assert graph.adjacency[targets][:, targets].abs().sum() > 0  # feature-to-feature edges exist


def test_edges_go_forward_only(graph):
    layer = torch.tensor([-1 if n["layer"] is None else n["layer"] for n in graph.nodes])
    t, s = graph.adjacency.nonzero(as_tuple=True)
    kinds = [graph.nodes[i]["kind"] for i in s.tolist()]
    features = torch.tensor([k == "feature" or k == "error" for k in kinds])
    assert (layer[s][features] < layer[t][features]).all()


def test_batched_equals_one_target_per_pass(graph):
    single = attribute(tiny_model("llama"), _transcoders(), IDS, batch_size=1)
    torch.testing.assert_close(single.adjacency, graph.adjacency, rtol=1e-4, atol=1e-5)


def test_pruning_keeps_the_reported_influence(graph):
    pruned = prune(graph, node_threshold=0.7, edge_threshold=0.9)
    influence = node_influence(graph)
    features = [i for i, n in enumerate(graph.nodes) if n["kind"] == "feature"]
    kept = [n["original_index"] for n in pruned.nodes if n["kind"] == "feature"]
    fraction = float(influence[kept].sum() / influence[features].sum())
    assert fraction == pytest.approx(pruned.meta["node_influence_kept"])
    assert 0.7 <= fraction < 1.0 and len(kept) < len(features)
    assert pruned.meta["edge_influence_kept"] >= 0.9
    assert [n["kind"] for n in pruned.nodes].count("error") == 3 * len(IDS)


def test_unmodified_splice_with_error_terms_is_exact(graph):
    """The intervention harness reproduces the real logit when nothing is scaled."""
    change = measured_change(tiny_model("llama"), _transcoders(), graph, IDS, [], 1.0)
    assert abs(change) < 1e-4


def test_json_and_html(graph, tmp_path):
    data = prune(graph).to_dict()
    text = json.dumps(data)
    assert json.loads(text)["nodes"][-1]["kind"] == "logit"
    page = write_graph_html(data, tmp_path / "graph.html").read_text()
    assert "<script" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    assert data["edges"] and all(0 <= e["source"] < len(data["nodes"]) for e in data["edges"])
    assert graph._repr_html_().startswith("<iframe") and "&lt;svg" in graph._repr_html_()


def test_refusals():
    with pytest.raises(UserInputError, match="Llama family"):
        attribute(tiny_model("gpt2"), {}, IDS)
    with pytest.raises(UserInputError, match="layer 5"):
        attribute(tiny_model("llama"), {5: _transcoders((0,))[0]}, IDS)
    with pytest.raises(UserInputError, match="single token"):
        attribute(tiny_model("llama"), _transcoders(), IDS, target="the cat")
