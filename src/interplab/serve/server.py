"""Build the server from plain arguments (what the CLI and the tests call) and run it."""

from __future__ import annotations

import os
from pathlib import Path

from interplab.errors import UserInputError


def build_state(model, *, vectors: str | None = None, saes: dict[str, str] | None = None,
                features: dict[str, str] | None = None, api_key: str | None = None, max_batch: int = 16,
                max_queue: int = 64, max_tokens: int = 512, max_prompt_tokens: int = 2048,
                max_body: int = 8 * 1024 * 1024, gather_s: float = 0.02, datasets: dict | None = None,
                transcoders: dict[str, str] | None = None, max_graph_tokens: int = 64,
                max_graph_features: int = 256):
    """A `ServerState` around a loaded model (the engine thread starts here)."""
    from interplab.models.handle import as_loaded
    from interplab.serve.engine import Engine
    from interplab.serve.registry import VectorRegistry, load_saes, load_transcoder_sets
    from interplab.serve.state import Limits, ServerState

    model = as_loaded(model)
    for name, value in (("max_tokens", max_tokens), ("max_prompt_tokens", max_prompt_tokens), ("max_body", max_body),
                        ("graph_max_tokens", max_graph_tokens), ("graph_max_features", max_graph_features)):
        if value < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    registry = load_saes(model, saes or {}, features or {})
    transcoder_sets = load_transcoder_sets(model, transcoders or {})
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, gather_s=gather_s)
    return ServerState(model, engine, VectorRegistry(model, Path(vectors) if vectors else None), registry,
                       Limits(max_tokens, max_prompt_tokens, max_body, max_graph_tokens, max_graph_features),
                       api_key=api_key or None, datasets=datasets if datasets is not None else caa_datasets(),
                       transcoders=transcoder_sets)


def caa_datasets() -> dict[str, Path]:
    """The CAA A/B test sets in the shared data folder, by behaviour name."""
    from interplab.models.loading import shared_root

    folder = shared_root() / "data" / "caa" / "test"
    if not folder.is_dir():
        return {}
    return {p.name: p / "test_dataset_ab.json" for p in sorted(folder.iterdir())
            if (p / "test_dataset_ab.json").is_file()}


def api_key_from_env(given: str | None) -> str | None:
    return given or os.environ.get("INTERPLAB_API_KEY") or None


def split_pairs(values: list[str], option: str, *, default_name: str | None = None) -> dict[str, str]:
    """NAME=VALUE pairs of a repeatable option (VALUE alone takes `default_name`)."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep:
            if default_name is None:
                raise UserInputError(f"{option} {value!r}: write NAME=PATH")
            name, rest = default_name, value
        if not name or not rest:
            raise UserInputError(f"{option} {value!r}: write NAME=PATH")
        if name in pairs:
            raise UserInputError(f"{option}: the name {name!r} is given twice")
        pairs[name] = rest
    return pairs


def transcoder_specs(values: list[str]) -> dict[str, str]:
    """--transcoders [NAME=]FOLDER pairs; a folder alone is named after itself."""
    return split_pairs([v if "=" in v else f"{Path(v.rstrip('/')).name}={v}" for v in values], "--transcoders")
