"""Checking a graph with interventions: set features to scale × their activation and compare the
change of the target logit (before any soft-cap) with what the graph predicts.

Prediction (the graph, features linearised): with M[t, s] = A[t, s] / a_s the change of target t
per unit change of source feature s's activation, setting the chosen features' activations to
scale·a_s (Δ_s = (scale − 1)·a_s, held there) changes every other active feature by Δ = M·Δ
(solved along the layers) and the logit by Σ_s M[logit, s]·Δ_s over all features.

Measurement, four ways, from the most constrained to the real model (`MODES`):

- "linear": the replacement model (attention patterns and norm scales frozen) with every other
  graph feature recomputed as its pre-activation, inactive latents kept off and error nodes fixed.
  This is exactly what the graph assumes, so it must equal the prediction to float precision: a
  check of `predicted_change` itself.
- "constrained": the same frozen attention and norms, every latent recomputed through the
  transcoder's own activation (TopK selection, thresholds), error terms of the prompt fixed. It
  differs from "linear" only where a downstream feature crosses its threshold (or leaves the top k).
- "frozen_attention": as "constrained" but every norm recomputed by the model's own module; the
  gap to "constrained" is what the norms' response costs, the gap to "free" the attention patterns'.
- "free": the real model with every transcoder spliced in for its MLP and the prompt's error terms
  added back (exact when nothing is changed); attention patterns, norms and all latents respond.
  The gap to "constrained" is the cost of freezing attention and norms.

The chosen features are clamped at scale × their activation in the real run in every mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.errors import UserInputError
from interplab.graph.attribution import Graph

MODES = ("linear", "constrained", "frozen_attention", "free")


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
    """Δ logit in the real model with transcoders spliced in ("free": attention, norms, latents respond)."""
    constrained: float
    """Δ logit with attention patterns and norm scales frozen, latents recomputed ("constrained")."""
    crossings: int
    """Latents (other than the scaled ones) that switched on or off in the constrained run; with 0
    the constrained change equals the prediction up to float error."""


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


def _replacement(model, transcoders, graph: Graph, ids: Tensor):
    """The replacement model the graph was built from (same features per layer)."""
    from interplab.graph.replacement import ReplacementModel

    cap = graph.meta.get("max_features_per_layer")
    return ReplacementModel(model, transcoders, ids, max_features_per_layer=cap)


def _edits(graph: Graph, nodes: Sequence[int], scale: float) -> dict[int, list[tuple[int, int, float]]]:
    """layer -> [(position, latent, clamped activation)] for the chosen feature nodes."""
    edits: dict[int, list[tuple[int, int, float]]] = {}
    for i in nodes:
        node = graph.nodes[i]
        if node["kind"] != "feature":
            raise UserInputError(f"node {i} is a {node['kind']} node; interventions scale feature nodes")
        edits.setdefault(node["layer"], []).append((node["position"], node["feature"], scale * node["value"]))
    return edits


def _clamp(acts: Tensor, edits: list[tuple[int, int, float]]) -> Tensor:
    """acts (..., seq, d_sae) with the edited latents set to their clamped values."""
    for p, f, value in edits:
        acts[..., p, f] = value
    return acts


def measured_change(model, transcoders, graph: Graph, ids: Tensor, nodes: Sequence[int], scale: float, *,
                    mode: str = "free", replacement=None) -> float:
    """Δ target logit when features `nodes` are set to scale × their activation, measured in
    `mode` (see the module docstring). `replacement`: the prompt's ReplacementModel, if built."""
    return _measure(model, transcoders, graph, ids, nodes, scale, mode, replacement)[0]


@torch.no_grad()
def _measure(model, transcoders, graph: Graph, ids: Tensor, nodes: Sequence[int], scale: float, mode: str,
             replacement=None) -> tuple[float, int | None]:
    """(Δ target logit, latents switched on/off (None in the linear and free modes))."""
    if mode not in MODES:
        raise UserInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    rm = replacement or _replacement(model, transcoders, graph, ids)
    edits = _edits(graph, nodes, scale)
    token, position = graph.target["token_id"], graph.target["position"]
    if mode == "free":
        return _free_logit(rm, edits, token, position) - graph.target["value"], None
    crossings = [0]
    mlp = _linear_mlp(rm, edits) if mode == "linear" else _constrained_mlp(rm, edits, crossings)
    _, final = (rm.live_norms() if mode == "frozen_attention" else rm).forward(rm.embeddings[None], mlp)
    logit = float(rm.logits(final[:, position])[0, token])
    return logit - graph.target["value"], None if mode == "linear" else crossings[0]


def _linear_mlp(rm, edits):
    """Graph features as their pre-activations (edited ones clamped), error nodes fixed."""
    def mlp(L: int, x: Tensor) -> Tensor:
        out = rm.errors[L] + rm.biases[L] + rm.skip(L, x)
        if L not in rm.features:
            return out
        fs, tc = rm.features[L], rm.transcoders[L]
        acts = torch.zeros(x.shape[:-1] + (tc.cfg.d_sae,))  # (1, seq, d_sae)
        acts[0, fs.positions, fs.features] = tc.pre_activations(x)[0, fs.positions, fs.features]
        acts = _clamp(acts, edits.get(L, []))
        return out + acts @ tc.W_dec / tc.output_scale
    return mlp


def _constrained_mlp(rm, edits, crossings: list[int]):
    """Every latent through the transcoder's activation (edited ones clamped), error terms fixed;
    counts into crossings[0] the latents whose on/off state differs from the real run."""
    errors = _transcoder_errors(rm)

    def mlp(L: int, x: Tensor) -> Tensor:
        tc = rm.transcoders.get(L)
        if tc is None:
            return rm.errors[L]
        acts = tc.encode(x)  # (1, seq, d_sae)
        switched = (acts[0] != 0) != (tc.encode(rm.mlp_inputs[L]) != 0)  # (seq, d_sae)
        for p, f, _ in edits.get(L, []):
            switched[p, f] = False
        crossings[0] += int(switched.sum())
        return tc.decode(_clamp(acts, edits.get(L, [])), x) + errors[L]
    return mlp


def _free_logit(rm, edits, token: int, position: int) -> float:
    """The target logit (before any soft-cap) of the real model with transcoders + error terms."""
    from interplab.hooks import HookSession
    from interplab.sae.transcoder_train import splice_fns

    model, transcoders = rm.model, rm.transcoders
    errors = _transcoder_errors(rm)

    def replace(layer, x, y):
        tc = transcoders[layer]
        acts = _clamp(tc.encode(x), edits.get(layer, []))  # (1, seq, d_sae)
        return (tc.decode(acts, x) + errors[layer]).to(y.dtype)

    last = {}
    fns = splice_fns(model, transcoders, None, replace)
    fns.setdefault(model.site(f"blocks.{model.n_layers - 1}.hook_resid_post"), []).append(
        lambda act, ctx: last.__setitem__("h", act))
    session = HookSession(model, fns).attach()
    try:
        model.hf(input_ids=rm.ids[None].to(model.device), use_cache=False)
    finally:
        session.remove()
    h = model.ln_final(last["h"][0, position])  # the pre-cap logit: lm_head(ln_f(h))
    return float(model.unembed(h)[token])


def _transcoder_errors(rm) -> dict[int, Tensor]:
    """Per transcoder layer: real MLP output − transcoder output on the real MLP input (added back
    so that an unmodified run is exact)."""
    return {L: _real_output(rm, L) - tc(rm.mlp_inputs[L]) for L, tc in rm.transcoders.items()}


def _real_output(rm, L: int) -> Tensor:
    """The real MLP output of layer L: what the replacement writes at that layer in total."""
    return rm.feature_writes(L) + rm.errors[L] + rm.biases[L] + rm.skip(L, rm.mlp_inputs[L])


def top_features(graph: Graph, n: int) -> list[int]:
    """The n feature nodes with the largest |direct effect| on the target logit."""
    row = graph.adjacency[graph.logit_index].abs()
    features = [i for i, node in enumerate(graph.nodes) if node["kind"] == "feature"]
    return sorted(features, key=lambda i: -float(row[i]))[:n]


def check_interventions(model, transcoders, graph: Graph, prompt_ids: Tensor, *, top: int = 3,
                        scales: Sequence[float] = (0.0,)) -> list[InterventionCheck]:
    """For each of the `top` features (and all of them together) and each scale: predicted,
    constrained and free (measured) change of the target logit."""
    rm = _replacement(model, transcoders, graph, prompt_ids)
    chosen = top_features(graph, top)
    groups = [[i] for i in chosen] + ([chosen] if len(chosen) > 1 else [])
    checks = []
    for group in groups:
        for scale in scales:
            measure = [_measure(model, transcoders, graph, prompt_ids, group, scale, mode, rm)
                       for mode in ("free", "constrained")]
            checks.append(InterventionCheck(group, scale, predicted_change(graph, group, scale), measure[0][0],
                                            measure[1][0], measure[1][1]))
    return checks
