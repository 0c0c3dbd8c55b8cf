"""The routes behind the web page (and handy for scripts): registry, features, lens, A/B numbers.

Everything that runs the model takes the engine's `model_lock` inside a worker thread, so it
never overlaps a generation batch and never blocks the event loop.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from interplab.serve.edits import build_edits
from interplab.serve.registry import check_name
from interplab.serve.schemas import ABRequest, APIError, LensRequest, VectorUpload
from interplab.serve.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/info")
    async def info():
        return {"model": state.model_name, **state.model.describe(), "context_window": state.window,
                "vectors": state.vectors.describe(), "saes": state.saes.describe(),
                "transcoders": state.transcoders.describe(),
                "datasets": sorted(state.datasets), "limits": vars(state.limits)}

    @api.get("/vectors")
    async def list_vectors():
        return {"data": state.vectors.describe()}

    @api.post("/vectors", status_code=201)
    async def add_vector(body: VectorUpload):
        from interplab.steering.vector import SteeringVector

        check_name(body.name)
        vector = _as_vector(lambda: SteeringVector({k: _floats(v) for k, v in body.directions.items()},
                                                   site=body.site, method="upload", model_id=state.model.model_id))
        state.vectors.add(body.name, vector, overwrite=body.overwrite)
        return {"name": body.name, "layers": vector.layers, "d_model": vector.d_model}

    @api.post("/vectors/upload", status_code=201)
    async def upload_vector(name: str = Form(...), files: list[UploadFile] = File(...), overwrite: bool = Form(False)):
        check_name(name)
        vector = await _read_uploaded_vector(files)
        state.vectors.add(name, vector, overwrite=overwrite)
        return {"name": name, "layers": vector.layers, "d_model": vector.d_model}

    @api.delete("/vectors/{name}")
    async def delete_vector(name: str):
        state.vectors.delete(name)
        return {"deleted": name}

    @api.get("/saes")
    async def list_saes():
        return {"data": state.saes.describe()}

    @api.get("/saes/{name}/features")
    async def search_features(name: str, q: str, limit: int = 20):
        with _index(state, name) as index:
            if not q.strip():
                raise APIError(400, "the search text is empty", param="q")
            hits = index.search(q, limit=max(1, min(limit, 100)))
        return {"data": [_plain(h) for h in hits]}

    @api.get("/saes/{name}/features/{feature}")
    async def feature_card(name: str, feature: int, contexts: int = 10):
        entry = state.saes.get(name)
        state.saes.check_feature(entry, feature)
        with _index(state, name) as index:
            return card_data(index, feature, contexts)

    @api.post("/lens")
    async def lens(body: LensRequest):
        return await run_in_threadpool(_lens, state, body)

    @api.post("/ab")
    async def ab(body: ABRequest):
        return await run_in_threadpool(_ab, state, body)

    return api


def _plain(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


def _floats(values: list[float]):
    import torch

    return torch.tensor(values, dtype=torch.float32)


def _as_vector(make):
    try:
        return make()
    except (ValueError, TypeError) as error:
        raise APIError(400, f"not a valid steering vector: {error}", param="directions", code="invalid_vector") from None


async def _read_uploaded_vector(files: list[UploadFile]):
    """A llama.cpp control vector (.gguf), or a vector folder's config.json + vectors.safetensors."""
    from interplab.steering.vector import CONFIG_FILE, TENSORS_FILE, SteeringVector, load_vector

    names = [Path(f.filename or "").name for f in files]
    with tempfile.TemporaryDirectory(prefix="interplab-upload-") as tmp:
        if len(files) == 1 and names[0].endswith(".gguf"):
            path = Path(tmp) / "vector.gguf"
            path.write_bytes(await files[0].read())
            return _as_vector(lambda: SteeringVector.from_gguf(path))
        if sorted(names) == sorted([CONFIG_FILE, TENSORS_FILE]):
            for upload, name in zip(files, names):
                (Path(tmp) / name).write_bytes(await upload.read())  # name is one of two fixed names
            return _as_vector(lambda: load_vector(tmp))
    raise APIError(400, f"upload either one .gguf file or the two files {CONFIG_FILE} and {TENSORS_FILE} "
                        f"of a vector folder; got {names}", param="files", code="invalid_vector")


@contextmanager
def _index(state: ServerState, name: str):
    index = state.saes.index(name)
    try:
        yield index
    finally:
        index.close()


def card_data(index, feature: int, n_contexts: int = 10) -> dict:
    """A feature card as JSON: summary, top contexts with per-token activations, logit effects, histogram."""
    summary = index.summary(feature)
    edges, counts = index.histogram(feature)
    effects = index.logit_effects(feature)
    contexts = [{"activation": c.activation, "max_pos": c.max_pos, "tokens": c.tokens, "acts": c.acts}
                for c in index.top_contexts(feature, max(1, min(n_contexts, 50)))]
    return {"feature": feature, "label": summary.label, "density": summary.density,
            "fire_count": summary.fire_count, "max_act": _finite(summary.max_act), "mean_act": _finite(summary.mean_act),
            "contexts": contexts, "promoted": effects.promoted, "suppressed": effects.suppressed,
            "histogram": {"edges": edges, "counts": counts}, "site": index.meta.get("site")}


def _finite(value):
    return value if value is None or math.isfinite(value) else None


def _lens(state: ServerState, body: LensRequest) -> dict:
    from interplab.analysis.attention import attention_pattern
    from interplab.analysis.lens import logit_lens

    model = state.model
    if not 0 <= body.layer < model.n_layers or not 0 <= body.head < model.n_heads:
        raise APIError(400, f"layer must be in 0..{model.n_layers - 1} and head in 0..{model.n_heads - 1}; "
                            f"got layer {body.layer}, head {body.head}", param="layer")
    ids = state.completion_ids(body.prompt)
    with state.engine.model_lock:
        result = logit_lens(model, body.prompt, top_k=body.top_k)
        with _eager_attention(model):
            pattern = attention_pattern(model, body.prompt, body.layer, body.head).pattern  # (q, k)
    n = len(result.tokens[0])
    return {"tokens": result.tokens[0], "rows": result.rows, "n_prompt_tokens": len(ids),
            "top_tokens": [[cell[:body.top_k] for cell in row[:n]] for row in result.top_tokens[0]],
            "top_probs": result.top_log_probs[0, :, :n].exp().tolist(),
            "attention": {"layer": body.layer, "head": body.head, "pattern": pattern[:n, :n].tolist()}}


@contextmanager
def _eager_attention(model):
    """Attention weights exist only with eager attention: switch to it for one capture, then back."""
    before = getattr(model.hf.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.hf.set_attn_implementation(before)


def _ab(state: ServerState, body: ABRequest) -> dict:
    """A/B behaviour score (normalised p(matching answer)) and damage (cross-entropy rise on neutral
    text), unsteered and with the request's steering, on a contrast set."""
    from interplab.interventions import intervene
    from interplab.steering import evaluate
    from interplab.steering.datasets import read_caa

    if body.dataset not in state.datasets:
        raise APIError(404, f"unknown contrast set {body.dataset!r}; known: {', '.join(sorted(state.datasets)) or 'none'}",
                       param="dataset", code="dataset_not_found")
    if any(getattr(e, "mode", None) == "logit_bias" for e in body.steering):
        raise APIError(400, "A/B numbers measure activation edits; a logit_bias edit changes no activation",
                       param="steering", code="invalid_steering")
    model = state.model
    path = state.datasets[body.dataset]
    dataset = read_caa(path)[:body.n_pairs]
    edits, _ = build_edits(model, body.steering, state.vectors, state.saes)
    by_site = {site.name: fns for site, fns in edits.items()}
    prompts = evaluate.ab_prompts(model, dataset)
    batches = evaluate._text_batches(model, list(evaluate.NEUTRAL_TEXTS), 8)
    with state.engine.model_lock:
        base_ab, base_mass = evaluate.ab_scores(model, prompts)
        base_lp = [evaluate._log_probs(model, b) for b in batches]
        with intervene(model, by_site) as handle:
            steered_ab, steered_mass = evaluate.ab_scores(model, prompts)
            steered_lp = []
            for batch in batches:
                handle.new_sequence()
                steered_lp.append(evaluate._log_probs(model, batch))
    base_ce, steered_ce = evaluate._cross_entropy(base_lp, batches), evaluate._cross_entropy(steered_lp, batches)
    return {"dataset": body.dataset, "n_pairs": len(prompts.texts),
            "baseline": {"p_match": base_ab, "p_ab": base_mass, "neutral_ce": base_ce},
            "steered": {"p_match": steered_ab, "p_ab": steered_mass, "neutral_ce": steered_ce},
            "damage": steered_ce - base_ce, "kl": evaluate._kl(base_lp, steered_lp, batches)}
