"""Attribution graphs on tiny random models with random transcoders: exactness of the replacement
model and completeness for every supported family (LayerNorm, parallel blocks, Gemma norms and
soft-capped logits included), batched == one target per pass, pruning, JSON and HTML."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from interplab.errors import UserInputError
from interplab.graph.attribution import attribute
from interplab.graph.check import MODES, _measure, check_interventions, measured_change, predicted_change, top_features
from interplab.graph.html import write_graph_html
from interplab.graph.prune import node_influence, prune
from interplab.sae.transcoder import Transcoder, TranscoderConfig
from tests.tiny import arch_params, tiny_model

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


def _perturbed(model_type: str, **config):
    """A copy of the tiny model with random norm gains and biases (HF initialises them to 1 and 0,
    which would hide a wrong gain or a bias treated as a source), and config changes."""
    model = copy.deepcopy(tiny_model(model_type))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            if p.dim() == 1:  # biases and norm gains
                p.add_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith("bias") else 0.3))
    for key, value in config.items():
        setattr(model.hf.config, key, value)
    return model


def _assert_complete(graph, tol):
    """value_t = Σ_s A[t, s] + bias_t at every feature and the logit, to tol plus float32 rounding of
    the terms: with random norm gains a logit can be the small difference of terms in the hundreds
    (edges up to ~340 and a bias of -143 for a logit of 0.3), where float32 alone errs by ~1e-6 of
    the terms' total size."""
    targets = [i for i, n in enumerate(graph.nodes) if n["kind"] in ("feature", "logit")]
    terms = graph.adjacency.double()[targets]
    recomposed = terms.sum(1) + graph.biases()[targets]
    size = terms.abs().sum(1) + graph.biases()[targets].abs()
    error = (recomposed - graph.values()[targets]).abs()
    allowed = tol * (1 + graph.values()[targets].abs()) + 1e-6 * size
    assert (error <= allowed).all(), f"worst: error {error.max():.3g}, allowed there {allowed[error.argmax()]:.3g}"


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


@pytest.mark.parametrize("model_type", arch_params())
def test_every_supported_family_is_complete(model_type):
    """LayerNorm (gpt2, gpt_neo, gpt_neox), parallel blocks (gpt_neox), Gemma's (1 + w) norms and
    post-sublayer norms (gemma*, olmo2), fused qkv (phi3, gpt2, gpt_neox): the frozen forward
    reproduces the real logit and the graph is complete."""
    model = _perturbed(model_type)
    graph = attribute(model, _transcoders(), IDS, batch_size=64)
    _assert_complete(graph, 1e-4)
    with torch.no_grad():
        real = model.hf(input_ids=IDS[None]).logits[0, -1]
    assert graph.target["model_logit"] == pytest.approx(float(real[graph.target["token_id"]]), abs=1e-4)
    assert graph.biases().abs().max() > 0.1


def test_soft_capped_logits_are_attributed_before_the_cap():
    """Gemma 2 with a cap small enough to bend the logit: the target is the pre-cap logit,
    cap·atanh(model logit / cap), and the graph is complete for it."""
    cap = 0.3
    model = _perturbed("gemma2", final_logit_softcapping=cap)
    graph = attribute(model, _transcoders(), IDS, batch_size=64)
    _assert_complete(graph, 1e-4)
    target = graph.target
    with torch.no_grad():
        real = float(model.hf(input_ids=IDS[None]).logits[0, -1, target["token_id"]])
    assert target["softcap"] == cap and target["model_logit"] == pytest.approx(real, abs=1e-5)
    assert target["value"] == pytest.approx(cap * float(torch.atanh(torch.tensor(real / cap))), rel=1e-3)
    assert abs(target["value"] - real) > 0.03  # the cap really bends it
    for mode in MODES:  # the check reads the pre-cap logit in every mode
        assert abs(measured_change(model, _transcoders(), graph, IDS, [], 1.0, mode=mode)) < 1e-4


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


@pytest.mark.parametrize("mode", MODES)
def test_unmodified_intervention_is_exact(graph, mode):
    """Every intervention harness reproduces the target logit when nothing is scaled."""
    change = measured_change(tiny_model("llama"), _transcoders(), graph, IDS, [], 1.0, mode=mode)
    assert abs(change) < 1e-4


def test_linear_intervention_equals_the_prediction(graph):
    """Frozen attention and norms, graph features linear, error nodes fixed: exactly what the graph
    assumes, so predicted_change must match it (single features, and a group across layers whose
    downstream effects go through the (I − M)⁻¹ solve)."""
    model, transcoders = tiny_model("llama"), _transcoders()
    ranked = top_features(graph, 1000)
    deep = [i for i in ranked if graph.nodes[i]["layer"] == 2]
    group = ranked[:3] + deep[:1]  # spans both transcoder layers
    assert {graph.nodes[i]["layer"] for i in group} == {0, 2}
    for nodes in ([ranked[0]], [ranked[1]], group):
        for scale in (0.0, 2.0):
            predicted = predicted_change(graph, nodes, scale)
            linear = measured_change(model, transcoders, graph, IDS, nodes, scale, mode="linear")
            assert linear == pytest.approx(predicted, rel=1e-4, abs=1e-5)
            assert abs(predicted) > 1e-3


def test_last_layer_features_need_no_linearisation_of_features(graph):
    """Layer 2 is the last layer with a transcoder: ablating one of its features changes no other
    feature, so the constrained intervention equals the prediction; the free one differs only by
    how the final norm (not frozen there) responds, which is what recomputing the norms shows."""
    model, transcoders = tiny_model("llama"), _transcoders()
    node = next(i for i in top_features(graph, 100) if graph.nodes[i]["layer"] == 2)
    predicted = predicted_change(graph, [node], 0.0)
    constrained = measured_change(model, transcoders, graph, IDS, [node], 0.0, mode="constrained")
    live_norms = measured_change(model, transcoders, graph, IDS, [node], 0.0, mode="frozen_attention")
    free = measured_change(model, transcoders, graph, IDS, [node], 0.0)
    assert constrained == pytest.approx(predicted, rel=1e-4, abs=1e-5)
    assert free != pytest.approx(predicted, rel=1e-3)
    assert live_norms == pytest.approx(free, rel=1e-4, abs=1e-5)


def test_check_interventions_reports_both_measurements(graph):
    checks = check_interventions(tiny_model("llama"), _transcoders(), graph, IDS, top=2, scales=(0.0,))
    assert [c.nodes for c in checks] == [[i] for i in top_features(graph, 2)] + [top_features(graph, 2)]
    for c in checks:
        assert c.constrained == pytest.approx(measured_change(
            tiny_model("llama"), _transcoders(), graph, IDS, c.nodes, 0.0, mode="constrained"), abs=1e-6)
    with pytest.raises(UserInputError, match="mode must be one of"):
        measured_change(tiny_model("llama"), _transcoders(), graph, IDS, [], 1.0, mode="frozen")


def test_json_and_html(graph, tmp_path):
    data = prune(graph).to_dict()
    text = json.dumps(data)
    assert json.loads(text)["nodes"][-1]["kind"] == "logit"
    page = write_graph_html(data, tmp_path / "graph.html").read_text()
    assert "<script" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    assert data["edges"] and all(0 <= e["source"] < len(data["nodes"]) for e in data["edges"])
    assert graph._repr_html_().startswith("<iframe") and "&lt;svg" in graph._repr_html_()


def test_refusals():
    llama = tiny_model("llama")
    unknown = dataclasses.replace(llama, arch=dataclasses.replace(llama.arch, model_type="falcon"))
    with pytest.raises(UserInputError, match="support llama, .*gpt_neox; .* is 'falcon'"):
        attribute(unknown, {}, IDS)
    with pytest.raises(UserInputError, match="layer 5"):
        attribute(tiny_model("llama"), {5: _transcoders((0,))[0]}, IDS)
    with pytest.raises(UserInputError, match="single token"):
        attribute(tiny_model("llama"), _transcoders(), IDS, target="the cat")


def test_crossings_count_latents_that_switch(graph):
    """A last-layer feature switches nothing on or off downstream; ablating the first-layer features
    moves the TopK selection at layer 2 of this random model."""
    model, transcoders = tiny_model("llama"), _transcoders()
    ranked = top_features(graph, 1000)
    last = next(i for i in ranked if graph.nodes[i]["layer"] == 2)
    first = [i for i in ranked if graph.nodes[i]["layer"] == 0][:5]
    assert _measure(model, transcoders, graph, IDS, [last], 0.0, "constrained")[1] == 0
    assert _measure(model, transcoders, graph, IDS, first, 0.0, "constrained")[1] > 0
