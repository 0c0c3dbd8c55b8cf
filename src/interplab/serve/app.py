"""The FastAPI application: OpenAI routes, workbench routes, the page, errors in OpenAI's shape."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from interplab.serve import graph_api, openai_api, workbench_api
from interplab.serve.schemas import APIError, error_body
from interplab.serve.security import Guard
from interplab.serve.state import ServerState

STATIC = Path(__file__).parent / "static"


def create_app(state: ServerState, *, cors: list[str] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.engine.close()

    app = FastAPI(title="interplab serve", lifespan=lifespan, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.interplab = state
    app.include_router(openai_api.router(state))
    app.include_router(workbench_api.router(state))
    app.include_router(graph_api.router(state))
    _error_handlers(app)

    @app.get("/static/graph.js", include_in_schema=False)
    async def graph_script():  # the attribution graph's drawing script, shared with standalone pages
        from interplab.graph.html import SCRIPT

        return FileResponse(SCRIPT, media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    # outermost: refuse unauthenticated or oversized requests before anything else runs
    app.add_middleware(Guard, api_key=state.api_key, max_body=state.limits.max_body)
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                            for e in problems[:5])
        return JSONResponse(error_body(f"invalid request: {message}", param=where or None, code="invalid_request"),
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), "invalid_request_error" if error.status_code < 500
                                       else "server_error"), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception):
        return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                            status_code=500)
