"""Checking a graph with interventions: scale features in the real model and compare the change
of the target logit with what the graph predicts.

Prediction (the graph, features linearised): with M[t, s] = A[t, s] / a_s the change of target t
per unit change of source feature s's activation, setting the chosen features' activations to
scale·a_s (Δ_s = (scale − 1)·a_s) changes every other active feature by Δ = M·Δ (solved along the
layers) and the logit by Σ_s M[logit, s]·Δ_s over all features.

Measurement: the real model with every transcoder spliced in for its MLP and the error terms of
the prompt added back (so that the unmodified run is exact), the chosen features' activations
scaled at their positions; attention, norms and all other features are recomputed, so the graph's
frozen-attention linearisation is put to the test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.graph.attribution import Graph


@dataclass(frozen=True)
class InterventionCheck:
    """Predicted and measured change of the target logit for one intervention."""

    nodes: list[int]
    """Indices (in the unpruned graph) of the features scaled."""
    scale: float
    """New activation = scale × old (0: ablation)."""
    predicted: float
    """Δ logit the graph predicts."""
    measured: float
    """Δ logit in the model."""


def predicted_change(graph: Graph, nodes: Sequence[int], scale: float) -> float:
    """Δ target logit from setting features `nodes` to scale × their activation, by the graph."""
    features = [i for i, n in enumerate(graph.nodes) if n["kind"] == "feature"]
    position = {node: j for j, node in enumerate(features)}
    acts = torch.tensor([graph.nodes[i]["value"] for i in features], dtype=torch.float64)
    A = graph.adjacency.double()
    M = A[features][:, features] / acts[None, :]  # (F, F): ∂ value_t / ∂ a_s
    to_logit = A[graph.logit_index, features] / acts  # (F,)
    clamped = torch.zeros(len(features), dtype=torch.bool)
    delta0 = torch.zeros(len(features), dtype=torch.float64)
    for node in nodes:
        clamped[position[node]] = True
        delta0[position[node]] = (scale - 1.0) * acts[position[node]]
    free = ~clamped
    # Δ_free = M_ff Δ_free + M_fc Δ_c  →  (I − M_ff) Δ_free = M_fc Δ_c
    system = torch.eye(int(free.sum()), dtype=torch.float64) - M[free][:, free]
    delta = delta0.clone()
    delta[free] = torch.linalg.solve(system, M[free][:, clamped] @ delta0[clamped])
    return float(to_logit @ delta)


@torch.no_grad()
def measured_change(model, transcoders, graph: Graph, ids: Tensor, nodes: Sequence[int], scale: float) -> float:
    """Δ target logit in the model with transcoders + fixed error terms, features scaled."""
    from interplab.graph.replacement import ReplacementModel
    from interplab.hooks import HookSession
    from interplab.sae.transcoder_train import splice_fns

    rm = ReplacementModel(model, transcoders, ids)
    real_out = {L: _real_output(rm, L) for L in transcoders}
    errors = {L: real_out[L] - transcoders[L](rm.mlp_inputs[L]) for L in transcoders}
    edits = {}
    for i in nodes:
        node = graph.nodes[i]
        edits.setdefault(node["layer"], []).append((node["position"], node["feature"]))

    def replace(layer, x, y):
        tc = transcoders[layer]
        acts = tc.encode(x)  # (1, seq, d_sae)
        for p, f in edits.get(layer, []):
            acts[0, p, f] = acts[0, p, f] * scale
        return (tc.decode(acts, x) + errors[layer]).to(y.dtype)

    token, position = graph.target["token_id"], graph.target["position"]
    session = HookSession(model, splice_fns(model, transcoders, None, replace)).attach()
    try:
        logits = model.hf(input_ids=ids[None].to(model.device), use_cache=False).logits
    finally:
        session.remove()
    return float(logits[0, position, token]) - graph.target["value"]


def _real_output(rm, L: int) -> Tensor:
    """The real MLP output of layer L: what the replacement writes at that layer in total."""
    return rm.feature_writes(L) + rm.errors[L] + rm.biases[L] + rm._skip(L, rm.mlp_inputs[L])


def top_features(graph: Graph, n: int) -> list[int]:
    """The n feature nodes with the largest |direct effect| on the target logit."""
    row = graph.adjacency[graph.logit_index].abs()
    features = [i for i, node in enumerate(graph.nodes) if node["kind"] == "feature"]
    return sorted(features, key=lambda i: -float(row[i]))[:n]


def check_interventions(model, transcoders, graph: Graph, prompt_ids: Tensor, *, top: int = 3,
                        scales: Sequence[float] = (0.0,)) -> list[InterventionCheck]:
    """For each of the `top` features (and all of them together) and each scale: predicted and
    measured change of the target logit."""
    chosen = top_features(graph, top)
    groups = [[i] for i in chosen] + ([chosen] if len(chosen) > 1 else [])
    return [InterventionCheck(group, scale, predicted_change(graph, group, scale),
                              measured_change(model, transcoders, graph, prompt_ids, group, scale))
            for group in groups for scale in scales]
