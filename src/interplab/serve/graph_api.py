"""Attribution graphs in the workbench: the transcoder sets, a graph for a prompt, and the card of
one transcoder feature (its logit effects, and its top contexts when the set has a feature index
for the layer).

A graph is built by `interplab.graph` itself (`attribute` then `prune`), in a worker thread under
the engine's `model_lock`, and answered as the same JSON as `interplab sae graph` writes
(`format_version` 1). A graph.json already written by the CLI is opened in the page itself (the
browser reads the file): the server never reads a path it is given.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from interplab.errors import UserInputError
from interplab.serve.schemas import APIError, GraphRequest
from interplab.serve.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/transcoders")
    async def list_transcoders():
        return {"data": state.transcoders.describe()}

    @api.post("/graph")
    async def graph(body: GraphRequest):
        return await run_in_threadpool(build_graph, state, body)

    @api.get("/transcoders/{name}/layers/{layer}/features/{feature}")
    async def feature_card(name: str, layer: int, feature: int, n: int = 10, contexts: int = 8):
        return await run_in_threadpool(transcoder_card, state, name, layer, feature, max(1, min(n, 50)),
                                       max(1, min(contexts, 50)))

    return api


def build_graph(state: ServerState, body: GraphRequest) -> dict:
    """The pruned graph's JSON; every check on the request comes before the model runs."""
    import torch

    from interplab.graph.attribution import attribute
    from interplab.graph.prune import prune

    name, transcoders = state.transcoders.get(body.transcoders)
    ids = state.completion_ids(body.prompt)
    limits = state.limits
    if len(ids) > limits.max_graph_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens; graphs are built for at most {limits.max_graph_tokens} "
                            "(--graph-max-tokens): a graph costs a backward pass per feature node",
                       param="prompt", code="prompt_too_long")
    cap = body.max_features_per_layer or limits.max_graph_features
    if cap > limits.max_graph_features:
        raise APIError(400, f"max_features_per_layer={cap} is more than this server allows "
                            f"({limits.max_graph_features}, --graph-max-features)", param="max_features_per_layer")
    target = body.target if body.target != "" else None
    try:
        with state.engine.model_lock:
            full = attribute(state.model, transcoders, torch.tensor(ids), target=target, max_features_per_layer=cap)
        pruned = prune(full, node_threshold=body.node_threshold, edge_threshold=body.edge_threshold)
    except UserInputError as error:  # an unsupported architecture, a target of several tokens, ...
        raise APIError(400, str(error), code="invalid_graph_request") from None
    return pruned.to_dict()


def transcoder_card(state: ServerState, name: str, layer: int, feature: int, n: int, n_contexts: int) -> dict:
    """A transcoder feature's card: its logit effects and, when the set has a feature index for the
    layer, its top contexts (per-token activations), density and histogram under "index" (else null)."""
    from interplab.serve.workbench_api import card_data

    card = logit_effects(state, name, layer, feature, n)
    index = state.transcoders.index(name, layer)
    if index is None:
        return {**card, "index": None}
    try:
        data = card_data(index, feature, n_contexts)
    finally:
        index.close()
    keep = ("label", "density", "fire_count", "max_act", "mean_act", "contexts", "histogram")
    return {**card, "index": {key: data[key] for key in keep}}


def logit_effects(state: ServerState, name: str, layer: int, feature: int, n: int) -> dict:
    """The tokens a transcoder feature promotes and suppresses: W_U (γ ⊙ W_dec[f] / s_out), what
    one unit of its activation adds to the logits through the final norm's weight γ (its 1/rms
    left out, as in the SAE feature cards)."""
    import torch

    from interplab.sae.features import logit_effect_matrix
    from interplab.sae.transcoder_train import mlp_input_site

    transcoder = state.transcoders.transcoder(name, layer)
    d_sae = transcoder.cfg.d_sae
    if not 0 <= feature < d_sae:
        raise APIError(400, f"feature {feature} is out of range: the layer-{layer} transcoder of {name!r} has {d_sae} "
                            f"latents (valid 0..{d_sae - 1})", param="feature", code="feature_out_of_range")
    model = state.model
    site = model.site(mlp_input_site(model, layer))
    with torch.no_grad():
        effects = logit_effect_matrix(model, transcoder, site, torch.tensor([feature]))[0].float().cpu()  # (vocab,)
    k = min(n, effects.shape[0])
    up, down = effects.topk(k), (-effects).topk(k)
    decode = model.require_tokenizer().decode
    return {"transcoders": name, "layer": layer, "feature": feature, "d_sae": d_sae,
            "promoted": [[decode([int(i)]), float(v)] for i, v in zip(up.indices, up.values)],
            "suppressed": [[decode([int(i)]), -float(v)] for i, v in zip(down.indices, down.values)]}
