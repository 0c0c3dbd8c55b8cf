"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from interplab.serve.batching import Row, Sampling
from interplab.serve.edits import build_edits
from interplab.serve.engine import QueueFull
from interplab.serve.schemas import APIError, ChatRequest, CompletionRequest, GenerationRequest
from interplab.serve.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.started,
                                            "owned_by": "interplab"}]}

    @api.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        ids = state.chat_ids([(m.role, m.text()) for m in body.messages])
        cap = body.max_completion_tokens or body.max_tokens
        return await _complete(state, body, [ids], cap, request, chat=True)

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        ids = [state.completion_ids(p, f"prompt[{i}]" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
        return await _complete(state, body, ids, body.max_tokens, request, chat=False)

    return api


async def _complete(state: ServerState, body: GenerationRequest, prompts: list[list[int]], max_tokens: int | None,
                    request: Request, *, chat: bool):
    if body.n != 1:
        raise APIError(400, f"n={body.n} is not supported; send n=1 (or several requests)", param="n")
    if body.stream and len(prompts) != 1:
        raise APIError(400, "streaming works with one prompt per request", param="stream")
    edits, biases = build_edits(state.model, body.steering, state.vectors, state.saes)
    stops = body.stop_strings()
    rows = []
    for ids in prompts:
        budget = state.token_budget(len(ids), max_tokens)
        sampling = Sampling(budget, body.temperature, body.top_p, body.seed, stops)
        rows.append(Row(ids, sampling, edits=edits, logit_biases=biases))
    tickets = _submit(state, rows)
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": state.model_name}
    if body.stream:
        return StreamingResponse(_stream(tickets[0], meta, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        for ticket in tickets:
            await _wait(ticket)
    except BaseException:
        for ticket in tickets:
            ticket.cancel()
        raise
    return JSONResponse(_response(rows, meta, chat))


def _submit(state: ServerState, rows: list[Row]):
    if state.engine.load + len(rows) > state.engine.max_queue:
        raise APIError(429, f"the server is busy: it already holds {state.engine.load} of at most "
                            f"{state.engine.max_queue} requests (--max-queue); retry shortly", code="queue_full")
    tickets = []
    try:
        for row in rows:
            tickets.append(state.engine.submit(row))
    except QueueFull as error:
        for ticket in tickets:
            ticket.cancel()
        raise APIError(429, str(error), code="queue_full") from None
    return tickets


async def _wait(ticket) -> None:
    while True:
        kind, value = await ticket.events.get()
        if kind == "done":
            return
        if kind == "error":
            raise _engine_error(value)


def _engine_error(error: Exception) -> APIError:
    if isinstance(error, QueueFull):
        return APIError(503, str(error), code="shutting_down")
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", code="generation_failed")


def _usage(rows: list[Row]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in rows)
    completion = sum(len(r.generated) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _response(rows: list[Row], meta: dict, chat: bool) -> dict:
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": r.finish_reason} for i, r in enumerate(rows)]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(rows)}
    choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
               for i, r in enumerate(rows)]
    return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(rows)}


def _chunk(meta: dict, chat: bool, text: str | None, finish: str | None, first: bool = False) -> str:
    if chat:
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        payload = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {**meta, "object": "text_completion", "choices": [choice]}
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(ticket, meta: dict, chat: bool):
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason, [DONE].
    If the client goes away, the generator is closed and the row is cancelled (its slot freed)."""
    finished = False
    try:
        if chat:
            yield _chunk(meta, chat, "", None, first=True)
        while True:
            kind, value = await ticket.events.get()
            if kind == "text":
                yield _chunk(meta, chat, value, None)
            elif kind == "done":
                finished = True
                yield _chunk(meta, chat, None if chat else "", ticket.row.finish_reason)
                break
            else:
                finished = True
                yield f"data: {json.dumps(_engine_error(value).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            ticket.cancel()
