"""`interplab serve MODEL`: the OpenAI-compatible API and the web workbench in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    model: Annotated[str, typer.Argument(help="An alias, a local HF folder or a Hub id.")] = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8000,
    vectors: Annotated[Optional[Path], typer.Option(help="Folder of steering vectors (one vector folder per name); uploads are saved there.")] = None,
    sae: Annotated[Optional[list[str]], typer.Option("--sae", help="NAME=FOLDER of an SAE to steer with (repeatable).")] = None,
    features: Annotated[Optional[list[str]], typer.Option("--features", help="[NAME=]INDEX.sqlite: the feature index of an SAE (repeatable; NAME defaults to the only SAE).")] = None,
    transcoders: Annotated[Optional[list[str]], typer.Option("--transcoders", help="[NAME=]FOLDER of transcoders (`interplab sae transcoders`) for attribution graphs (repeatable; NAME defaults to the folder's name).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' (default: $INTERPLAB_API_KEY).")] = None,
    insecure_public: Annotated[bool, typer.Option("--insecure-public", help="Allow a non-loopback --host without an API key.")] = False,
    cors: Annotated[Optional[list[str]], typer.Option("--cors", help="Allow browser requests from this origin (repeatable).")] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests generated together in one batch.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Most requests held (waiting + running); past it the server answers 429.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Most tokens one request may generate.")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens.")] = 2048,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (uploads included), in MB.")] = 8.0,
    graph_max_tokens: Annotated[int, typer.Option(help="Longest prompt an attribution graph is built for, in tokens.")] = 64,
    graph_max_features: Annotated[int, typer.Option(help="Most feature nodes per layer in an attribution graph (the most active kept).")] = 256,
) -> None:
    """Serve MODEL: an OpenAI-compatible API with per-request steering, and the web workbench."""
    from interplab.cli.core import load_model
    from interplab.errors import UserInputError
    from interplab.serve.security import check_bind
    from interplab.serve.server import api_key_from_env, split_pairs, transcoder_specs

    try:
        key = api_key_from_env(api_key)
        check_bind(host, key, insecure_public)
        sae_specs = split_pairs(sae or [], "--sae")
        only = next(iter(sae_specs)) if len(sae_specs) == 1 else None
        index_specs = split_pairs(features or [], "--features", default_name=only)
        tc_specs = transcoder_specs(transcoders or [])
    except UserInputError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    handle = load_model(model)
    try:
        state, app = _build(handle, vectors, sae_specs, index_specs, key, cors, max_batch, max_queue, max_tokens,
                            max_prompt_tokens, int(max_body_mb * 1024 * 1024),
                            dict(transcoders=tc_specs, max_graph_tokens=graph_max_tokens,
                                 max_graph_features=graph_max_features))
    except (ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    _run(app, host, port, key)


def _build(handle, vectors, saes, indexes, key, cors, max_batch, max_queue, max_tokens, max_prompt_tokens, max_body,
           graphs: dict):
    from interplab.serve.app import create_app
    from interplab.serve.schemas import APIError
    from interplab.serve.server import build_state

    try:
        state = build_state(handle, vectors=str(vectors) if vectors else None, saes=saes, features=indexes,
                            api_key=key, max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens,
                            max_prompt_tokens=max_prompt_tokens, max_body=max_body, **graphs)
    except APIError as error:  # a bad vector or SAE name met while loading the registries
        raise ValueError(error.message) from None
    return state, create_app(state, cors=cors)


def _run(app, host: str, port: int, key: str | None) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                shown = f"[{host}]" if ":" in host else host
                typer.echo(f"interplab workbench: http://{shown}:{bound}/")
                typer.echo(f"OpenAI-compatible API: http://{shown}:{bound}/v1"
                           + ("  (Authorization: Bearer KEY required)" if key else ""))
                typer.echo("Ctrl-C stops the server.")

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown
        pass
    typer.echo("interplab serve stopped.")
