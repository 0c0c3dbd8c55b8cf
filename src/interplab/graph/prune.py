"""Pruning an attribution graph by influence on the target logit (Ameisen et al. 2025, §"Pruning").

    Â[t, s]     = |A[t, s]| / Σ_s' |A[t, s']|          (each target's inputs as fractions)
    B           = Â + Â² + Â³ + … = (I − Â)⁻¹ − I        (indirect influence along all paths)
    influence_s = B[logit, s]                            (how much of the logit flows through s)

Feature nodes are kept in order of influence until they carry `node_threshold` of the total
feature influence; embeddings, error nodes and the logit are always kept. Then, among edges
between kept nodes, edge influence = Â[t, s]·(influence_t, 1 for the logit) and edges are kept
in order until they carry `edge_threshold` of the total. The fractions actually kept are
reported in the graph's meta.
"""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.errors import UserInputError
from interplab.graph.attribution import Graph


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """Â: absolute edges, each target's row divided by its sum (rows without inputs stay 0)."""
    absolute = adjacency.abs().double()
    total = absolute.sum(1, keepdim=True)
    return torch.where(total > 0, absolute / total.clamp_min(1e-300), torch.zeros_like(absolute))


def node_influence(graph: Graph) -> Tensor:
    """influence_s on the target logit for every node (1 for the logit itself)."""
    a_hat = normalized_adjacency(graph.adjacency)
    n = a_hat.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    total = torch.linalg.solve(eye - a_hat, eye) - eye  # (I − Â)⁻¹ − I; invertible: the graph is acyclic
    influence = total[graph.logit_index].clone()
    influence[graph.logit_index] = 1.0
    return influence


def _keep_until(scores: Tensor, threshold: float) -> Tensor:
    """Mask of the smallest set of largest scores whose sum reaches threshold·total."""
    order = scores.argsort(descending=True)
    cumulative = scores[order].cumsum(0)
    total = float(cumulative[-1]) if len(cumulative) else 0.0
    if total <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    n_keep = int((cumulative < threshold * total - 1e-12).sum()) + 1
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[: min(n_keep, len(scores))]] = True
    return mask


def prune(graph: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
    """A pruned copy of `graph` (see the module docstring); meta records the influence kept."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            raise UserInputError(f"{name} must be in (0, 1], got {value}")
    influence = node_influence(graph)
    is_feature = torch.tensor([n["kind"] == "feature" for n in graph.nodes])
    keep = ~is_feature
    keep[is_feature] = _keep_until(influence[is_feature], node_threshold)
    feature_total = float(influence[is_feature].sum())
    node_kept = float(influence[is_feature & keep].sum()) / feature_total if feature_total > 0 else 1.0
    a_hat = normalized_adjacency(graph.adjacency)
    edge_scores = a_hat * influence[:, None]  # Â[t, s]·influence_t
    edge_scores[~keep] = 0
    edge_scores[:, ~keep] = 0
    flat = edge_scores.flatten()
    edge_mask = _keep_until(flat, edge_threshold).view_as(edge_scores) & (graph.adjacency != 0)
    edge_total = float(flat.sum())
    edge_kept = float(edge_scores[edge_mask].sum()) / edge_total if edge_total > 0 else 1.0
    index = keep.nonzero()[:, 0]
    adjacency = (graph.adjacency * edge_mask)[index][:, index]
    nodes = [dict(graph.nodes[i], influence=float(influence[i]), original_index=int(i)) for i in index.tolist()]
    meta = dict(graph.meta, pruned=True, node_threshold=node_threshold, edge_threshold=edge_threshold,
                node_influence_kept=node_kept, edge_influence_kept=edge_kept,
                features_kept=int((is_feature & keep).sum()), features_total=int(is_feature.sum()))
    return Graph(nodes, adjacency, graph.tokens, graph.target, meta)
