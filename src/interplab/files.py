"""The one place where interplab writes and reads files.

Writes are atomic: a file is written to a temporary sibling and renamed onto its target; a
folder artifact (config + tensors) is built in a temporary sibling folder and swapped in whole,
so a failure never leaves a folder whose parts disagree. Written files get the mode the user's
umask gives (``mkstemp`` alone would give 0600).

Reads go through small wrappers that turn format errors (a truncated safetensors file, a
non-UTF-8 text file, broken JSON) into an `ArtifactError` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from interplab.errors import ArtifactError


def current_umask() -> int:
    """The process umask (read without changing it for longer than two syscalls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: str | Path, *, folder: bool = False) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of `path`, then rename it onto `path`.

    On any error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Indented JSON (NaN refused: it is not JSON), written atomically."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """A dict of tensors as safetensors (made contiguous first), written atomically."""
    from safetensors.torch import save_file

    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder artifact in a temporary sibling and swap it in whole on success.

    ``with atomic_folder(out) as tmp: write config and tensors into tmp`` leaves either the old
    folder or the new one at `out`, never a mix; on an error the temporary folder is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a folder: choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _apply_umask(tmp, folder=True)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)      # between these two renames the target is absent, never mixed
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------------

def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a folder; expected a {what}") from None
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path} is not UTF-8 text (byte {err.start}): expected a {what}; "
                            "convert it to UTF-8") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): the {what} "
                            "is damaged or was not written by interplab; write it again") from None


def read_json_object(path: str | os.PathLike, what: str = "config") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def load_tensors(path: str | os.PathLike, what: str = "tensor file", device: str = "cpu") -> dict:
    """Read a safetensors file; a truncated or corrupt one (an interrupted download is common)
    gives an `ArtifactError` naming the file instead of a raw SafetensorError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such {what}")
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own SafetensorError / OSError flavours
        raise ArtifactError(f"{path} is not a readable safetensors {what} ({err}): it is truncated "
                            "or corrupt (an interrupted download or copy?); fetch or write it again") from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with a single write call (a kill tears at most this line)."""
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines log; a torn last line (a kill during an append) is ignored, a damaged
    line anywhere else is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = read_text(path, "JSON-lines log").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break           # torn tail: the process was killed while appending it
            raise ArtifactError(f"{path}: line {i + 1} is not valid JSON; the log is damaged") from None
    return records


# --- digests and config fields -----------------------------------------------------------------

DIGEST_PREFIX = "sha256:"


def tensors_digest(tensors: dict) -> str:
    """A digest of a dict of tensors (names, dtypes, shapes and bytes), independent of file layout.

    Written into an artifact's config beside its tensors and checked at load, it catches a config
    and a tensor file that do not belong together (a half-finished write, a hand-copied file)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return DIGEST_PREFIX + digest.hexdigest()[:32]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks), in the same form as `tensors_digest`."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return DIGEST_PREFIX + digest.hexdigest()[:32]


def check_digest(expected: Any, actual: str, config_path: str | os.PathLike, tensors_path: str | os.PathLike) -> None:
    """Refuse tensors whose digest differs from the one recorded in the config (None: not recorded,
    as in files written before digests existed)."""
    if expected is None:
        return
    if expected != actual:
        raise ArtifactError(f"{tensors_path} does not belong to {config_path}: the config records tensor "
                            f"digest {expected} but the file holds {actual} (a half-finished write, or files "
                            "copied from different artifacts); write the artifact again")


def config_field(config: dict, key: str, types: type | tuple, path: str | os.PathLike, *,
                 default: Any = ..., what: str = "config") -> Any:
    """`config[key]` after checking its type; a missing or mistyped field is an `ArtifactError`
    naming the field and the file (instead of a KeyError/TypeError later)."""
    if key not in config:
        if default is not ...:
            return default
        raise ArtifactError(f"{path}: the {what} lacks the field {key!r}; the file is damaged or was "
                            "not written by interplab")
    value = config[key]
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
        names = " or ".join(t.__name__ for t in wanted)
        raise ArtifactError(f"{path}: field {key!r} of the {what} must be {names}, got "
                            f"{type(value).__name__} {value!r}")
    return value


def check_replaceable(path: str | os.PathLike, is_same_kind: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace an existing non-empty folder that is not a `what` (an atomic folder write
    swaps out the whole folder, so writing a vector into ``runs/`` must not delete ``runs/``)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not is_same_kind(path):
        raise ArtifactError(f"{path} is a folder that holds other files and is not a {what}; "
                            f"writing the {what} there would replace them: choose a new or empty folder")


def finite_json(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (JSON has no NaN), recursively
    through dicts, lists and tuples; for results where a missing value is legitimate."""
    import math

    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data
