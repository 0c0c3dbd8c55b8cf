"""A minimal OpenAI-compatible chat-completions endpoint for tests, started in a thread: it really
generates with a local model through `interplab.generate` (greedy). interplab's own server
(src/interplab/serve/) was not on main when this was written; use it here once it is."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from pydantic import BaseModel


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    max_tokens: int | None = 40
    temperature: float | None = 0.0


def _app(model):
    from fastapi import FastAPI

    from interplab.generation import generate
    from interplab.tokens import max_positions

    app = FastAPI()
    app.state.requests = []

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> dict:
        prompt = "\n".join(m.content for m in request.messages)
        # a tiny test model has a short context window: generate only what fits in it
        room = max_positions(model) - len(model.tokenizer(prompt)["input_ids"])
        text = generate(model, prompt, max_new_tokens=max(1, min(request.max_tokens or 40, room)))[0]
        app.state.requests.append((prompt, text))
        return {"id": f"chatcmpl-{len(app.state.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": request.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    return app


@contextmanager
def local_server(model):
    """Serve `model` on 127.0.0.1 (a free port); yields (base_url, app)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = _app(model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
