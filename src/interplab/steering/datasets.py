"""Contrast datasets: pairs of a positive and a negative completion of the same prompt.

Readers (every error names the file, the line and the key):

- CAA A/B JSON (Panickssery et al. 2024, github.com/nrimsky/CAA `datasets/`): a list of
  {"question": "...\\n\\nChoices:\\n(A) ...\\n(B) ...", "answer_matching_behavior": "(A)",
  "answer_not_matching_behavior": "(B)"}; the pair is the question followed by each answer
  letter, and the chat template is applied to the question when the model has one.
- JSONL of {"prompt", "positive", "negative"} (the prompt is chat-formatted, the completions
  follow it) or of {"positive", "negative"} full texts (used as they are).
- An ActAdd prompt pair (Turner et al. 2023), e.g. "Love" vs "Hate": raw texts compared
  position by position at the start of the prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from interplab.errors import ArtifactError
from interplab.files import read_text

AB_ANSWER = re.compile(r"^\(([AB])\)$")
KINDS = ("ab", "prompt_completion", "texts", "actadd")


@dataclass(frozen=True)
class ContrastPair:
    """One prompt with a positive and a negative completion."""

    positive: str
    """The completion showing the behaviour (or a full text when `prompt` is empty)."""
    negative: str
    """The completion not showing it."""
    prompt: str = ""
    """The shared prompt (a user message; chat-formatted when the model has a template)."""

    @property
    def ab_letters(self) -> tuple[str, str] | None:
        """("A", "B") style letters of the matching and non-matching answers, for A/B pairs."""
        pos, neg = AB_ANSWER.match(self.positive), AB_ANSWER.match(self.negative)
        return (pos.group(1), neg.group(1)) if pos and neg else None


@dataclass(frozen=True)
class ContrastDataset:
    """An ordered, non-empty collection of contrast pairs and how to read them."""

    pairs: tuple[ContrastPair, ...]
    """The pairs, in file order."""
    kind: str = "prompt_completion"
    """ab (CAA A/B), prompt_completion, texts (full texts) or actadd (a prompt pair)."""
    source: str = ""
    """Where the pairs came from (a path or 'command line')."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"dataset kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if not self.pairs:
            where = f" in {self.source}" if self.source else ""
            raise ValueError(f"the contrast dataset{where} is empty: give at least one pair")
        object.__setattr__(self, "pairs", tuple(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[ContrastPair]:
        return iter(self.pairs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ContrastDataset(self.pairs[index], self.kind, self.source)
        return self.pairs[index]

    @property
    def uses_chat(self) -> bool:
        """Whether prompts are chat-formatted (when the model has a template)."""
        return self.kind in ("ab", "prompt_completion")

    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the pairs (kind included)."""
        data = json.dumps([self.kind] + [[p.prompt, p.positive, p.negative] for p in self.pairs])
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def split(self, holdout: float, seed: int = 0) -> tuple["ContrastDataset | None", "ContrastDataset | None"]:
        """(train, held-out) with a `holdout` fraction held out (shuffled with `seed`)."""
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        order = list(range(len(self.pairs)))
        random.Random(seed).shuffle(order)
        n_test = int(round(holdout * len(order)))
        if n_test == 0 or n_test == len(order):
            return self, None
        test, train = sorted(order[:n_test]), sorted(order[n_test:])
        return self._subset(train), self._subset(test)

    def _subset(self, indices: Sequence[int]) -> "ContrastDataset":
        return ContrastDataset(tuple(self.pairs[i] for i in indices), self.kind, self.source)


# --- readers ----------------------------------------------------------------------------------

def read_pairs(path: str | os.PathLike, *, skip_invalid: bool = False) -> ContrastDataset:
    """Read a contrast file: `.jsonl` (prompt/positive/negative objects, one a line) or
    `.json` (a CAA A/B list, or a list of prompt/positive/negative objects).
    `skip_invalid` drops (with a warning) CAA items whose answers are not (A)/(B), such as
    the few (C)/(D) items in CAA's power-seeking and survival-instinct test sets."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no contrast-pair file at {path}")
    text = read_text(path, "contrast-pair file")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        return _read_jsonl(text, str(path))
    items = json_list_items(text, str(path))
    if items and isinstance(items[0][1], dict) and "question" in items[0][1]:
        return _caa_dataset(items, str(path), skip_invalid)
    return _pairs_dataset(items, str(path))


def read_caa(path: str | os.PathLike, *, skip_invalid: bool = False) -> ContrastDataset:
    """Read a CAA A/B dataset (a JSON list of question / answer_matching_behavior /
    answer_not_matching_behavior objects)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no CAA dataset at {path}")
    return _caa_dataset(json_list_items(read_text(path, "CAA dataset"), str(path)), str(path), skip_invalid)


def actadd_pair(positive: str, negative: str) -> ContrastDataset:
    """An ActAdd prompt pair (e.g. "Love", "Hate"), compared position by position."""
    for name, value in (("positive", positive), ("negative", negative)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"the ActAdd {name} prompt is empty")
    return ContrastDataset((ContrastPair(positive, negative),), kind="actadd", source="command line")


def pairs_from_texts(pairs: Sequence[tuple[str, str]], *, prompt: str = "", source: str = "") -> ContrastDataset:
    """A dataset from (positive, negative) tuples: full texts, or completions of `prompt`."""
    made = tuple(ContrastPair(_text(p, i, "positive", source), _text(n, i, "negative", source), prompt)
                 for i, (p, n) in enumerate(pairs))
    return ContrastDataset(made, kind="prompt_completion" if prompt else "texts", source=source)


def caa_path(behavior: str, split: str = "generate") -> Path:
    """Path of a CAA behaviour file in the shared data folder ($INTERPLAB_SHARED/data/caa)."""
    from interplab.models.loading import shared_root

    if split not in ("generate", "test"):
        raise ValueError(f"split must be 'generate' or 'test', got {split!r}")
    folder = shared_root() / "data" / "caa" / split / behavior
    name = "generate_dataset.json" if split == "generate" else "test_dataset_ab.json"
    path = folder / name
    if not path.exists():
        available = sorted(p.name for p in folder.parent.iterdir()) if folder.parent.is_dir() else []
        raise ValueError(f"no CAA {split} data for {behavior!r} at {path}; available: {available}")
    return path


# --- parsing ----------------------------------------------------------------------------------

def json_list_items(text: str, source: str) -> list[tuple[int, object]]:
    """Parse a JSON list, returning (line number, item) for each item so that errors can
    name the line."""
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if index >= len(text) or text[index] != "[":
        raise ValueError(f"{source}:{_line(text, index)}: expected a JSON list ('[' ...), "
                         f"found {text[index:index + 20]!r}")
    index = _skip_space(text, index + 1)
    items: list[tuple[int, object]] = []
    if index < len(text) and text[index] == "]":
        return items
    while True:
        try:
            item, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
        items.append((_line(text, index), item))
        index = _skip_space(text, end)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)
            continue
        if index < len(text) and text[index] == "]":
            return items
        raise ValueError(f"{source}:{_line(text, index)}: invalid JSON: expected ',' or ']' after "
                         f"item {len(items) - 1}")


def _read_jsonl(text: str, source: str) -> ContrastDataset:
    pairs, kinds = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{number}:{err.colno}: invalid JSON: {err.msg}") from None
        pair, kind = _pair_from_object(item, f"{source}:{number}")
        pairs.append(pair)
        kinds.add(kind)
    return _finish(pairs, kinds, source)


def _pairs_dataset(items, source: str) -> ContrastDataset:
    pairs, kinds = [], set()
    for line, item in items:
        pair, kind = _pair_from_object(item, f"{source}:{line}")
        pairs.append(pair)
        kinds.add(kind)
    return _finish(pairs, kinds, source)


def _finish(pairs, kinds, source: str) -> ContrastDataset:
    if len(kinds) > 1:
        raise ValueError(f"{source}: some lines have a 'prompt' and some do not; use one form for the "
                         "whole file")
    return ContrastDataset(tuple(pairs), kinds.pop() if kinds else "texts", source)


def _pair_from_object(item, where: str) -> tuple[ContrastPair, str]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with 'positive' and 'negative', got "
                         f"{type(item).__name__}")
    for key in ("positive", "negative"):
        if key not in item:
            raise ValueError(f"{where}: missing key {key!r} (each item needs 'positive' and "
                             f"'negative', and optionally 'prompt'); it has {sorted(item)}")
    positive, negative = (_field(item, key, where) for key in ("positive", "negative"))
    if "prompt" in item:
        return ContrastPair(positive, negative, _field(item, "prompt", where)), "prompt_completion"
    return ContrastPair(positive, negative), "texts"


def _caa_dataset(items, source: str, skip_invalid: bool = False) -> ContrastDataset:
    pairs, skipped = [], []
    for line, item in items:
        where = f"{source}:{line}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with 'question', 'answer_matching_behavior' "
                             f"and 'answer_not_matching_behavior', got {type(item).__name__}")
        for key in ("question", "answer_matching_behavior", "answer_not_matching_behavior"):
            if key not in item:
                raise ValueError(f"{where}: missing key {key!r}; it has {sorted(item)}")
        question = _field(item, "question", where)
        try:
            matching = _ab_answer(item, "answer_matching_behavior", where)
            other = _ab_answer(item, "answer_not_matching_behavior", where)
        except ValueError:
            if not skip_invalid:
                raise
            skipped.append(line)
            continue
        if matching == other:
            raise ValueError(f"{where}: answer_matching_behavior and answer_not_matching_behavior "
                             f"are both {matching!r}")
        pairs.append(ContrastPair(matching, other, question))
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} items whose answers are not (A)/(B) "
                      f"(lines {skipped[:5]}{' ...' if len(skipped) > 5 else ''})", UserWarning, stacklevel=3)
    return ContrastDataset(tuple(pairs), kind="ab", source=source)


def _ab_answer(item: dict, key: str, where: str) -> str:
    value = _field(item, key, where).strip()
    if not AB_ANSWER.match(value):
        raise ValueError(f"{where}: key {key!r} is {item[key]!r}; A/B answers must be '(A)' or '(B)' "
                         "(skip such items with skip_invalid=True / --skip-invalid)")
    return value


def _field(item: dict, key: str, where: str) -> str:
    value = item[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    if key != "prompt" and not value.strip():
        raise ValueError(f"{where}: key {key!r} is empty")
    return value


def _text(value, index: int, name: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source or 'pairs'}: pair {index} has an empty or non-string {name} text")
    return value


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _line(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1
