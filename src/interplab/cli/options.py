"""The options every `interplab` command shares, and the checks that run before a model loads.

The conventions (docs/cli.md): the model is `--model/-m`; outputs are `--out/-o` and an
existing output is refused unless `--overwrite`; generated tokens are `--max-new-tokens/-n`;
`--layers`; `--scale/-s` is one number and `--scales` a sweep; counts spell their noun
(`--n-prompts`, `--n-contexts`, `--n-tokens`, `--n-pairs`); the same thing has the same default.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from interplab.errors import UserInputError

DEFAULT_MODEL = "smollm2-135m-instruct"
N_PROMPTS = 8            # IOI prompts in ablate, patch, attribute and lens
CONTEXT_LENGTH = 128     # tokens per corpus window in every `sae` command
MAX_NEW_TOKENS = 40      # generated tokens in generate, steer and sae steer
POSITIONS = "all"        # where a steering vector is added (as in SteeringVector.apply)

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="An alias (see `interplab models`), a local HF folder or a Hub id.")]
ArtifactModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="An alias, a local HF folder or a Hub id. [default: the model the file was made on]",
    show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing output instead of refusing.")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="New tokens per continuation.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
ChatOpt = Annotated[Optional[bool], typer.Option(
    "--chat/--no-chat", help="Apply the chat template. [default: when the model has one]", show_default=False)]
ScaleOpt = Annotated[float, typer.Option("--scale", "-s", help="Strength of the edit (the vector is multiplied by it).")]
ScalesOpt = Annotated[str, typer.Option(help="A sweep of scales, comma-separated, e.g. '-2,-1,0,1,2'.")]
PositionsOpt = Annotated[str, typer.Option(
    help="Where to add the vector: all; caa (the paper's rule: from the first token after the chat "
         "template's assistant header on); caa_tail (from the end of the user's message on, template "
         "included); or actadd (a position-aligned ActAdd vector).")]


def parse_numbers(text: str, what: str = "number") -> list[float]:
    """'-2,-1,0,1,2' -> floats, or a UserInputError naming the bad entry."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise UserInputError(f"{what} {part!r} is not a number (give comma-separated numbers, e.g. -2,0,2)") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise UserInputError(f"{what} {part!r} is not a finite number")
        values.append(value)
    return values


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'6,10', '4-12' or 'all' -> block indices, checked against the model."""
    text = str(text).strip()
    if text == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if match is None:
            raise UserInputError(f"layer {part.strip()!r} is not an integer or a range like 4-12")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        for layer in range(first, last + 1):
            if not -n_layers <= layer < n_layers:
                raise UserInputError(f"layer {layer} is out of range: the model has {n_layers} blocks "
                                     f"(valid 0..{n_layers - 1} or -{n_layers}..-1)")
            layers.append(layer % n_layers)
    if not layers:
        raise UserInputError("no layers given")
    return list(dict.fromkeys(layers))


def config_n_layers(model: str) -> int | None:
    """The number of blocks from the model's config.json, without loading weights (None for a
    Hub id not yet downloaded: the load itself checks then)."""
    from interplab.models.loading import ALIASES, resolve_source

    if model.lower() not in ALIASES and not Path(model).expanduser().is_dir():
        return None
    config = Path(resolve_source(model)) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def check_layers_early(text: str | None, model: str) -> None:
    """Refuse a layer out of range before the model loads, when its config is readable."""
    if text is None:
        return
    n_layers = config_n_layers(model)
    if n_layers is not None:
        parse_layers(text, n_layers)


def check_choice(value: str, option: str, choices) -> str:
    """`value` if it is one of `choices`, else a UserInputError listing them."""
    if value not in choices:
        raise UserInputError(f"{option} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise UserInputError(f"{option} must be >= 1, got {value}")


def prepare_out(path: Path, overwrite: bool) -> Path:
    """Refuse an existing output unless --overwrite (then remove it); checked before any work."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            kind = "folder" if path.is_dir() else "file"
            raise UserInputError(f"{path} already exists ({kind}); pass --overwrite to replace it or choose "
                                 "another --out")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return path
