"""Attribution graphs: direct effects between the nodes of a local replacement model.

Nodes: token embeddings (one per position), active transcoder features, error nodes (one per
layer and position) and the target logit. In the replacement model (`replacement.py`) every
quantity is linear in the sources (embeddings, feature writes a_f·d_f, errors), so the edge

    A[t, s] = ∂ value_t / ∂ (write of s) · (write of s)

is the direct effect of source s on target t, and for every target (feature pre-activation or
logit)

    value_t = Σ_s A[t, s] + bias_t                                      (completeness)

with bias_t the target's value when every source is zero (the biases of transcoders, norms
and attention projections).
For an active feature, value_t is its pre-activation, which equals its activation.
Ameisen et al. 2025, "Circuit tracing: revealing computational graphs in language models".

One backward pass gives the gradients of one target at every source at once; `batch_size`
targets share a pass (one forward pass of the prompt, a backward pass batched over the targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.errors import UserInputError
from interplab.graph.replacement import ReplacementModel, soft_cap


@dataclass
class Graph:
    """An attribution graph (unpruned unless `pruned` says otherwise)."""

    nodes: list[dict]
    """One dict per node: kind ('embedding', 'feature', 'error', 'logit'), layer, position, feature,
    value, bias, token."""
    adjacency: Float[Tensor, "n n"]
    """A[t, s]: the direct effect of node s on node t."""
    tokens: list[str]
    """The prompt's tokens."""
    target: dict
    """The target logit: token id, token, position, value (before any soft-cap), probability,
    softcap (Gemma 2's final cap or None) and model_logit (after the cap, what the model outputs)."""
    meta: dict = field(default_factory=dict)
    """Model, layers with transcoders, pruning settings and the influence kept."""

    @property
    def logit_index(self) -> int:
        return len(self.nodes) - 1

    def values(self) -> Tensor:
        return torch.tensor([n["value"] for n in self.nodes], dtype=torch.float64)

    def biases(self) -> Tensor:
        return torch.tensor([n["bias"] for n in self.nodes], dtype=torch.float64)

    def _repr_html_(self) -> str:
        """The interactive page inside a notebook cell (an iframe holding the standalone page)."""
        import html

        from interplab.graph.html import graph_html

        return f'<iframe style="width:100%;height:600px;border:0" srcdoc="{html.escape(graph_html(self.to_dict()))}"></iframe>'

    def to_dict(self, min_weight: float = 0.0) -> dict:
        """JSON-ready: nodes, and edges (source, target, weight) with |weight| > min_weight."""
        t, s = (self.adjacency.abs() > min_weight).nonzero(as_tuple=True)
        weights = self.adjacency[t, s].tolist()
        edges = [{"source": int(a), "target": int(b), "weight": w} for a, b, w in zip(s.tolist(), t.tolist(), weights)]
        return {"format_version": 1, "tokens": self.tokens, "target": self.target, "meta": self.meta,
                "nodes": self.nodes, "edges": edges}


def attribute(model, transcoders, prompt, *, target: str | int | None = None, batch_size: int = 64,
              max_features_per_layer: int | None = None) -> Graph:
    """The unpruned attribution graph of `prompt` (a text or 1-D token ids) for the logit of
    `target` (a token string or id; default: the model's top prediction) at the last position."""
    from interplab.models.handle import as_loaded

    model = as_loaded(model)
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    ids = _prompt_ids(model, prompt)
    replacement = ReplacementModel(model, transcoders, ids, max_features_per_layer=max_features_per_layer)
    token = _target_token(model, replacement, target)
    nodes = _nodes(model, replacement, token)
    targets = [i for i, n in enumerate(nodes) if n["kind"] in ("feature", "logit")]
    adjacency = torch.zeros(len(nodes), len(nodes))
    for start in range(0, len(targets), batch_size):
        rows = targets[start:start + batch_size]
        edges, biases = direct_effects(replacement, [nodes[i] for i in rows], token)
        adjacency[rows] = edges
        for i, b in zip(rows, biases.tolist()):
            nodes[i]["bias"] = b
    logits = replacement.real_logits[-1]  # before any soft-cap: the graph's target
    capped = soft_cap(logits, replacement.softcap)
    info = {"token_id": token, "token": _decode(model, token), "position": len(ids) - 1,
            "value": float(logits[token]), "probability": float(capped.softmax(-1)[token]),
            "softcap": replacement.softcap, "model_logit": float(capped[token])}
    meta = {"model": model.model_id, "transcoder_layers": sorted(transcoders), "pruned": False,
            "max_features_per_layer": max_features_per_layer}
    return Graph(nodes, adjacency, [_decode(model, int(i)) for i in ids], info, meta)


def source_layout(replacement: ReplacementModel) -> list[tuple[str, int | None, int, int | None]]:
    """(kind, layer, position, feature) of every source node, in node order."""
    out = [("embedding", None, p, None) for p in range(replacement.seq)]
    for L in sorted(replacement.features):
        fs = replacement.features[L]
        out += [("feature", L, int(p), int(f)) for p, f in zip(fs.positions.tolist(), fs.features.tolist())]
    out += [("error", L, p, None) for L in range(replacement.n_layers) for p in range(replacement.seq)]
    return out


def _nodes(model, replacement: ReplacementModel, token: int) -> list[dict]:
    nodes = []
    values = {}
    for L, fs in replacement.features.items():
        for p, f, a in zip(fs.positions.tolist(), fs.features.tolist(), fs.activations.tolist()):
            values[(L, p, f)] = a
    for kind, layer, p, f in source_layout(replacement):
        if kind == "embedding":
            value = float(replacement.embeddings[p].norm())
        elif kind == "feature":
            value = values[(layer, p, f)]
        else:
            value = float(replacement.errors[layer][p].norm())
        nodes.append({"kind": kind, "layer": layer, "position": p, "feature": f, "value": value, "bias": 0.0,
                      "token": _decode(model, int(replacement.ids[p]))})
    nodes.append({"kind": "logit", "layer": replacement.n_layers, "position": replacement.seq - 1, "feature": token,
                  "value": float(replacement.real_logits[-1, token]), "bias": 0.0, "token": _decode(model, token)})
    return nodes


def direct_effects(replacement: ReplacementModel, targets: list[dict], token: int) -> tuple[Tensor, Tensor]:
    """Edges (len(targets), n_nodes) into each target from every source, and each target's bias.

    The replacement model is linear in its sources and the same for every target, so one forward
    pass of the prompt serves them all; the targets' gradients come from one backward pass
    batched over them (vmap over the output gradients, ``is_grads_batched``)."""
    rm, b = replacement, len(targets)
    embeddings = rm.embeddings[None].clone().requires_grad_()  # (1, seq, d)
    writes = [(rm.feature_writes(L) + rm.errors[L])[None].clone().requires_grad_() for L in range(rm.n_layers)]
    values = _target_values(rm, targets, token, *rm.forward(embeddings, rm.node_mlp(writes)))  # (b,)
    leaves = [embeddings, *writes]
    grads = _batched_grads(values, leaves)  # each (b, seq, d)
    edges = [(grads[0] * rm.embeddings).sum(-1)]  # (b, seq)
    for L in sorted(rm.features):
        fs = rm.features[L]
        # grads · direction of each feature at its own position: one matmul, then each column's position
        per_position = grads[1 + L] @ fs.directions.T  # (b, seq, n_features_L)
        edges.append(per_position[:, fs.positions, torch.arange(len(fs.positions))])  # (b, n_features_L)
    edges += [(grads[1 + L] * rm.errors[L]).sum(-1) for L in range(rm.n_layers)]  # (b, seq) each
    edges.append(torch.zeros(b, 1))  # the logit is never a source
    with torch.no_grad():
        zeros = [torch.zeros_like(w) for w in writes]
        bias = _target_values(rm, targets, token, *rm.forward(torch.zeros_like(embeddings), rm.node_mlp(zeros)))
    return torch.cat(edges, dim=1).detach(), bias


def _batched_grads(values: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """d values[i] / d leaf for every i, as (len(values), *leaf.shape[1:]) per leaf (zeros where a
    leaf does not reach a value: later layers never reach an earlier target)."""
    eye = torch.eye(len(values), dtype=values.dtype, device=values.device)
    grads = torch.autograd.grad(values, leaves, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    return [x.new_zeros(len(values), *x.shape[1:]) if g is None else g[:, 0]
            for x, g in zip(leaves, grads)]


def _target_values(rm: ReplacementModel, targets: list[dict], token: int, inputs: list[Tensor], final: Tensor) -> Tensor:
    """Each target's value (a feature's pre-activation or the target logit) in the one-row forward."""
    values = []
    for node in targets:
        if node["kind"] == "logit":
            values.append(rm.logits(final[:1, -1])[0, token])
        else:
            tc = rm.transcoders[node["layer"]]
            x = inputs[node["layer"]][0, node["position"]]
            values.append((x * tc.input_scale) @ tc.W_enc[:, node["feature"]] + tc.b_enc[node["feature"]])
    return torch.stack(values)


def _prompt_ids(model, prompt) -> Tensor:
    if isinstance(prompt, str):
        tokenizer = model.require_tokenizer()
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.as_tensor(prompt).long()
    if ids.dim() != 1 or len(ids) < 1:
        raise UserInputError("the prompt must be a text or a 1-D list of token ids")
    return ids


def _target_token(model, replacement: ReplacementModel, target) -> int:
    if target is None:
        return int(replacement.real_logits[-1].argmax())
    if isinstance(target, int):
        if not 0 <= target < replacement.real_logits.shape[-1]:
            raise UserInputError(f"target token id {target} is outside the vocabulary (0..{replacement.real_logits.shape[-1] - 1})")
        return target
    ids = model.require_tokenizer()(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserInputError(f"target {target!r} is {len(ids)} tokens; give a single token (e.g. with its leading space)")
    return int(ids[0])


def _decode(model, token: int) -> str:
    tokenizer = model.tokenizer
    return tokenizer.decode([token]) if tokenizer is not None else str(token)
