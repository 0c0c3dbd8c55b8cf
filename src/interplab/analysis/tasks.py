"""Tasks: prompts, the answers they should produce, and the metric that scores them.

A `Task` is plain data (texts and words). `encode(model)` checks it against a
model's tokenizer and turns it into token ids, answer token ids and named token
positions (`EncodedTask`). Metrics score the next-token logits at the last
prompt token:

    logit_diff  logit[correct] - logit[incorrect]   (Wang et al. 2022, IOI)
    prob        softmax(logits)[correct]
    loss        -log softmax(logits)[correct]

Generators: `ioi_task` (indirect object identification, Wang et al. 2022,
"Interpretability in the Wild") and `load_facts` (factual recall from JSONL).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.models.handle import LoadedModel, as_loaded
from interplab.tokens import to_batch

METRICS = ("logit_diff", "prob", "loss")


@dataclass(frozen=True)
class Task:
    """A behaviour to explain: clean prompts whose next token should be `correct`."""

    # Sequences (lists or tuples) are accepted and stored as tuples, so a Task is immutable.
    clean: Sequence[str]
    """Prompts that show the behaviour."""
    correct: Sequence[str]
    """The right next word for each clean prompt; must be one token (e.g. " Mary" with its space)."""
    incorrect: Sequence[str] | None = None
    """A wrong next word per prompt (needed by the logit_diff metric), e.g. " John"."""
    corrupted: Sequence[str] | None = None
    """Counterpart prompts without the behaviour, for patching; each must tokenise to as many
    tokens as its clean prompt unless `position_map` says how positions correspond."""
    metric: str = "logit_diff"
    """One of "logit_diff", "prob", "loss" (see the module docstring)."""
    marks: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """Named positions given as a character offset per clean prompt (e.g. "IO": where the
    indirect object's name starts); the token covering that character is the mark. "end"
    (the last prompt token) is always available."""
    position_map: Sequence[Sequence[int]] | None = None
    """For pairs whose token lengths differ: for each pair (or one entry for all pairs), the clean
    token position that each corrupted token position corresponds to (-1: none, never patched)."""
    multi_token: str = "error"
    """What to do with an answer word of several tokens: "error", or "first" (score its first token)."""
    name: str = "task"
    """A short name for reports."""

    def __post_init__(self) -> None:
        for name in ("clean", "correct", "incorrect", "corrupted"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _texts(value, name))
        object.__setattr__(self, "marks", {k: tuple(int(i) for i in v) for k, v in dict(self.marks).items()})
        if self.position_map is not None:
            object.__setattr__(self, "position_map", tuple(tuple(int(i) for i in m) for m in self.position_map))
        self._check()

    def _check(self) -> None:
        n = len(self.clean)
        if n == 0:
            raise ValueError("a task needs at least one clean prompt")
        for name in ("correct", "incorrect", "corrupted"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"the task has {n} clean prompts but {len(value)} {name} entries; "
                                 "give one per clean prompt")
        for label, offsets in self.marks.items():
            if len(offsets) != n:
                raise ValueError(f"mark {label!r} has {len(offsets)} offsets for {n} prompts; give one per prompt")
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is unknown; use one of {', '.join(METRICS)}")
        if self.metric == "logit_diff" and self.incorrect is None:
            raise ValueError("the logit_diff metric needs an incorrect answer per prompt; give "
                             "incorrect=... or use metric='prob' or 'loss'")
        if self.multi_token not in ("error", "first"):
            raise ValueError(f"multi_token must be 'error' or 'first', got {self.multi_token!r}")
        if self.position_map is not None and len(self.position_map) not in (1, n):
            raise ValueError(f"position_map has {len(self.position_map)} entries; give one for all "
                             f"pairs or one per pair ({n})")

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, n: int) -> "Task":
        """The first n prompts (and their answers, counterparts and marks)."""
        pmap = self.position_map if self.position_map is None or len(self.position_map) == 1 else self.position_map[:n]
        return Task(self.clean[:n], self.correct[:n], _head(self.incorrect, n), _head(self.corrupted, n), self.metric,
                    {k: v[:n] for k, v in self.marks.items()}, pmap, self.multi_token, self.name)

    def encode(self, model) -> "EncodedTask":
        """Token ids, answer ids and mark positions for `model`, checked before any forward pass."""
        return encode_task(as_loaded(model), self)


def _head(items: tuple | None, n: int) -> tuple | None:
    return None if items is None else items[:n]


def _texts(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of strings, one per prompt, not a single string")
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ValueError(f"{name}[{i}] must be a non-empty string, got {item!r}")
    return items


# --- encoded form ------------------------------------------------------------------------------

@dataclass
class EncodedTask:
    """A task as token ids for one model. Prompts are right-padded, so a token's index in the
    sequence is its absolute position."""

    task: Task
    clean_ids: Int[Tensor, "batch seq"]
    clean_mask: Int[Tensor, "batch seq"]
    correct: Int[Tensor, "batch"]
    incorrect: Int[Tensor, "batch"] | None
    clean_marks: dict[str, Int[Tensor, "batch"]]
    corrupted_ids: Int[Tensor, "batch seq_c"] | None = None
    corrupted_mask: Int[Tensor, "batch seq_c"] | None = None
    corrupted_marks: dict[str, Int[Tensor, "batch"]] | None = None
    to_clean: Int[Tensor, "batch seq_c"] | None = None
    """For each corrupted position, the clean position it corresponds to (-1: none)."""
    to_corrupted: Int[Tensor, "batch seq"] | None = None
    """For each clean position, the corrupted position it corresponds to (-1: none)."""

    def __len__(self) -> int:
        return self.clean_ids.shape[0]

    def run(self, which: str) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) of the "clean" or "corrupted" prompts."""
        if which == "clean":
            return self.clean_ids, self.clean_mask
        self.require_corrupted()
        return self.corrupted_ids, self.corrupted_mask

    def last(self, which: str) -> Int[Tensor, "batch"]:
        """Position of each prompt's last token (where the answer is predicted)."""
        return self.run(which)[1].sum(-1) - 1

    def marks(self, which: str) -> dict[str, Tensor]:
        return self.clean_marks if which == "clean" else self.corrupted_marks

    def require_corrupted(self) -> None:
        if self.corrupted_ids is None:
            raise ValueError(f"task {self.task.name!r} has no corrupted prompts; patching compares a "
                             "clean and a corrupted run: give Task(corrupted=[...]) (or a 'corrupted' "
                             "field on every line of the facts file)")

    def score(self, logits: Float[Tensor, "rows vocab"]) -> Float[Tensor, "rows"]:
        """The task's metric per row; rows may be k copies of each prompt, a prompt's copies next to
        each other (row b * k + j is prompt b)."""
        repeats = logits.shape[0] // len(self)
        correct = self.correct.repeat_interleave(repeats).to(logits.device)
        incorrect = None if self.incorrect is None else self.incorrect.repeat_interleave(repeats).to(logits.device)
        return score(logits, correct, incorrect, self.task.metric)


def score(logits: Float[Tensor, "rows vocab"], correct: Int[Tensor, "rows"],
          incorrect: Int[Tensor, "rows"] | None, metric: str) -> Float[Tensor, "rows"]:
    """logit_diff, prob or loss of each row's answer (see the module docstring)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    if metric == "logit_diff":
        return logits[rows, correct] - logits[rows, incorrect]
    log_probs = logits.log_softmax(-1)[rows, correct]
    return log_probs.exp() if metric == "prob" else -log_probs


def encode_task(model: LoadedModel, task: Task) -> EncodedTask:
    tokenizer = model.require_tokenizer()
    clean = to_batch(model, list(task.clean), side="right")
    correct = answer_token_ids(tokenizer, task.correct, task.multi_token, "correct")
    incorrect = None if task.incorrect is None else answer_token_ids(tokenizer, task.incorrect, task.multi_token, "incorrect")
    lengths = clean.attention_mask.sum(-1)
    clean_marks = _mark_positions(tokenizer, task, lengths)
    enc = EncodedTask(task, clean.input_ids, clean.attention_mask, correct, incorrect, clean_marks)
    if task.corrupted is not None:
        corrupted = to_batch(model, list(task.corrupted), side="right")
        enc.corrupted_ids, enc.corrupted_mask = corrupted.input_ids, corrupted.attention_mask
        enc.to_clean = _position_map(task, tokenizer, clean, corrupted)
        enc.to_corrupted = _invert(enc.to_clean, clean.input_ids.shape[1])
        enc.corrupted_marks = {k: _translate(v, enc.to_corrupted) for k, v in clean_marks.items()}
        enc.corrupted_marks["end"] = corrupted.attention_mask.sum(-1) - 1
    return enc


def token_texts(tokenizer, ids) -> list[str]:
    """Each token id as the text it stands for (" Mary", not the vocabulary's "ĠMary")."""
    return [tokenizer.decode([int(i)]) for i in ids]


def answer_token_ids(tokenizer, words: Sequence[str], multi_token: str, what: str) -> Tensor:
    ids = []
    for i, word in enumerate(words):
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"{what} answer {i} ({word!r}) has no tokens")
        if len(tokens) > 1 and multi_token == "error":
            pieces = token_texts(tokenizer, tokens)
            raise ValueError(
                f"{what} answer {i} ({word!r}) is {len(tokens)} tokens {pieces}, but the metrics score "
                "one next token. Pick a word that is a single token (often with a leading space, "
                "e.g. ' Paris'), or pass Task(..., multi_token='first') to score its first token.")
        ids.append(tokens[0])
    return torch.tensor(ids, dtype=torch.long)


def _mark_positions(tokenizer, task: Task, lengths: Tensor) -> dict[str, Tensor]:
    marks = {}
    if task.marks:
        offsets = [tokenizer(text, return_offsets_mapping=True)["offset_mapping"] for text in task.clean]
        for label, chars in task.marks.items():
            marks[label] = torch.tensor([_token_at(offsets[i], c, label, i) for i, c in enumerate(chars)])
    marks["end"] = lengths - 1
    return marks


def _token_at(offsets: list[tuple[int, int]], char: int, label: str, prompt: int) -> int:
    for position, (start, end) in enumerate(offsets):
        if start <= char < end:
            return position
    raise ValueError(f"mark {label!r} of prompt {prompt} points at character {char}, which no token covers")


def _position_map(task: Task, tokenizer, clean, corrupted) -> Tensor:
    """(batch, seq_c): the clean position of each corrupted position."""
    n, width = corrupted.input_ids.shape
    clean_len, corrupted_len = clean.attention_mask.sum(-1), corrupted.attention_mask.sum(-1)
    out = torch.full((n, width), -1, dtype=torch.long)
    if task.position_map is None:
        for i in range(n):
            if clean_len[i] != corrupted_len[i]:
                raise ValueError(_length_message(tokenizer, task, i, clean, corrupted))
            out[i, : clean_len[i]] = torch.arange(int(clean_len[i]))
        return out
    for i in range(n):
        mapping = task.position_map[i if len(task.position_map) > 1 else 0]
        if len(mapping) != corrupted_len[i] or max(mapping) >= clean_len[i] or min(mapping) < -1:
            raise ValueError(
                f"position_map for pair {i} has {len(mapping)} entries with values up to {max(mapping)}; it "
                f"needs one entry per corrupted token ({int(corrupted_len[i])}) and values in "
                f"-1..{int(clean_len[i]) - 1} (clean positions)")
        out[i, : len(mapping)] = torch.tensor(mapping)
    return out


def _length_message(tokenizer, task: Task, i: int, clean, corrupted) -> str:
    c_tokens = token_texts(tokenizer, clean.input_ids[i][clean.attention_mask[i].bool()].tolist())
    k_tokens = token_texts(tokenizer, corrupted.input_ids[i][corrupted.attention_mask[i].bool()].tolist())
    return (
        f"clean prompt {i} is {len(c_tokens)} tokens but its corrupted counterpart is {len(k_tokens)}, so "
        f"positions do not line up for patching.\n  clean:     {c_tokens}\n  corrupted: {k_tokens}\n"
        "Make the counterpart tokenise to the same length (e.g. swap in names that are one token each), "
        "or pass Task(..., position_map=[[clean position for each corrupted position], ...]).")


def _invert(to_clean: Tensor, clean_width: int) -> Tensor:
    out = torch.full((to_clean.shape[0], clean_width), -1, dtype=torch.long)
    for i, row in enumerate(to_clean.tolist()):
        for corrupted_pos, clean_pos in enumerate(row):
            if clean_pos >= 0 and out[i, clean_pos] < 0:
                out[i, clean_pos] = corrupted_pos
    return out


def _translate(positions: Tensor, mapping: Tensor) -> Tensor:
    return mapping[torch.arange(len(positions)), positions]


def position_selector(enc: EncodedTask, which: str, position) -> Tensor | None:
    """Per-prompt token position (batch,) for a mark name or an int, or None for every position."""
    if position is None or position == "all":
        return None
    if isinstance(position, str):
        marks = enc.marks(which)
        if position not in marks:
            raise ValueError(f"no mark named {position!r}; this task has {sorted(marks)}")
        return marks[position]
    if isinstance(position, int) and not isinstance(position, bool):
        lengths = enc.run(which)[1].sum(-1)
        if not -int(lengths.min()) <= position < int(lengths.max()):
            raise ValueError(f"position {position} is out of range: the prompts are "
                             f"{int(lengths.min())}..{int(lengths.max())} tokens long")
        return lengths + position if position < 0 else torch.full_like(lengths, position)
    raise TypeError(f"a position is an int, a mark name or None, got {position!r}")


def valid_positions(enc: EncodedTask, which: str) -> Bool[Tensor, "batch seq"]:
    """Positions of the run that have a counterpart in the other run (patchable)."""
    mapping = enc.to_clean if which == "corrupted" else enc.to_corrupted
    if mapping is None:
        return enc.run(which)[1].bool()
    return mapping >= 0


# --- IOI --------------------------------------------------------------------------------------

IOI_TEMPLATES = (
    "When {X1} and {X2} went to the {place}, {S} gave a {object} to",
    "Then, {X1} and {X2} went to the {place}. {S} gave a {object} to",
    "After {X1} and {X2} went to the {place}, {S} gave a {object} to",
    "While {X1} and {X2} were working at the {place}, {S} gave a {object} to",
    "Friends {X1} and {X2} found a {object} at the {place}. {S} gave it to",
    "When {X1} and {X2} got a {object} at the {place}, {S} decided to give it to",
    "Then, {X1} and {X2} had a long argument, and afterwards {S} said to",
    "After the lunch, {X1} and {X2} went to the {place}. {S} gave a {object} to",
)
IOI_NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Martin", "Amy", "Anna", "Paul", "Kate", "Lisa", "Mark",
    "Sarah", "David", "Michael", "Alice", "Bob", "Emma", "Jack", "Laura", "Peter", "Rachel", "Steve",
    "Chris", "Alex", "Ben", "Sam", "Max", "Luke", "Jane", "Ruth", "George", "Henry", "Lucy", "Anne",
)
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
IOI_OBJECTS = ("drink", "ring", "bone", "basketball", "computer", "necklace", "snack", "apple")


def ioi_task(n: int = 16, *, seed: int = 0, templates: Sequence[str] | None = None,
             names: Sequence[str] | None = None, orders: Sequence[str] = ("ABBA", "BABA"),
             corruption: str = "s2", tokenizer=None) -> Task:
    """Indirect object identification prompts (Wang et al. 2022).

    "When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object,
    IO) rather than " John" (the subject, S). ABBA puts IO first ("Mary and John ... John"), BABA
    puts S first ("John and Mary ... John"); prompts alternate between the given orders.

    corruption "s2": the second mention of S becomes the IO name ("..., Mary gave a drink to"), which
    flips the right answer, so logit_diff(" Mary" - " John") turns negative; the only changed token is
    the S2 position. "abc": all three names are replaced by three other names.
    Marks: "IO", "S1" (first mention of S), "S2" (second mention), plus "end".
    With `tokenizer`, names that are not one token (with their leading space) are left out.
    Templates use {X1}, {X2}, {S}, {place}, {object}.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if corruption not in ("s2", "abc"):
        raise ValueError(f"corruption must be 's2' or 'abc', got {corruption!r}")
    for order in orders:
        if order not in ("ABBA", "BABA"):
            raise ValueError(f"orders must be 'ABBA' or 'BABA', got {order!r}")
    pool = _single_token_names(list(names or IOI_NAMES), tokenizer)
    if len(pool) < 5:
        raise ValueError(f"need at least 5 names (after removing multi-token ones), got {pool}")
    rng = random.Random(seed)
    rows = [_ioi_prompt(rng, rng.choice(list(templates or IOI_TEMPLATES)), orders[i % len(orders)], pool, corruption)
            for i in range(n)]
    marks = {label: tuple(r["marks"][label] for r in rows) for label in ("IO", "S1", "S2")}
    return Task(clean=[r["clean"] for r in rows], correct=[" " + r["io"] for r in rows],
                incorrect=[" " + r["s"] for r in rows], corrupted=[r["corrupted"] for r in rows],
                metric="logit_diff", marks=marks, name="ioi")


def _single_token_names(names: list[str], tokenizer) -> list[str]:
    if tokenizer is None:
        return names
    return [name for name in names if len(tokenizer(" " + name, add_special_tokens=False)["input_ids"]) == 1]


def _ioi_prompt(rng: random.Random, template: str, order: str, pool: list[str], corruption: str) -> dict:
    io, s, *others = rng.sample(pool, 5)
    x1, x2 = (io, s) if order == "ABBA" else (s, io)
    fill = {"X1": x1, "X2": x2, "S": s, "place": rng.choice(IOI_PLACES), "object": rng.choice(IOI_OBJECTS)}
    clean, offsets = _fill(template, fill)
    if corruption == "s2":
        corrupted, _ = _fill(template, {**fill, "S": io})
    else:
        a, b, c = others
        corrupted, _ = _fill(template, {**fill, "X1": a, "X2": b, "S": c if order == "ABBA" else a})
    io_slot, s_slot = ("X1", "X2") if order == "ABBA" else ("X2", "X1")
    marks = {"IO": offsets[io_slot], "S1": offsets[s_slot], "S2": offsets["S"]}
    return {"clean": clean, "corrupted": corrupted, "io": io, "s": s, "marks": marks}


def _fill(template: str, values: dict[str, str]) -> tuple[str, dict[str, int]]:
    """Format `template`, returning the text and the character offset of each slot."""
    text, offsets, last = "", {}, 0
    for match in re.finditer(r"\{(\w+)\}", template):
        text += template[last:match.start()]
        offsets[match.group(1)] = len(text)
        text += values[match.group(1)]
        last = match.end()
    return text + template[last:], offsets


# --- factual recall from JSONL ----------------------------------------------------------------

def load_facts(path: str | Path, *, metric: str | None = None, multi_token: str = "error") -> Task:
    """A factual-recall task from a JSONL file, one object per line:

        {"prompt": "The Eiffel Tower is in the city of", "answer": " Paris",
         "incorrect": " Rome", "corrupted": "The Colosseum is in the city of"}

    "incorrect" and "corrupted" are optional but must be on every line or on none. The metric
    defaults to logit_diff when incorrect answers are given, else prob.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"facts file {path} does not exist")
    rows = []
    from interplab.files import read_text

    for number, line in enumerate(read_text(path, "facts file").splitlines(), start=1):
        if line.strip():
            rows.append(_fact_row(line, number, path))
    if not rows:
        raise ValueError(f"facts file {path} has no lines; write one JSON object per line")
    optional = {}
    for key in ("incorrect", "corrupted"):
        present = [key in row for row in rows]
        if any(present) and not all(present):
            missing = [i + 1 for i, p in enumerate(present) if not p][:5]
            raise ValueError(f"{path}: {key!r} is on some lines but missing on others (e.g. entries {missing}); "
                             "give it on every line or on none")
        optional[key] = [row[key] for row in rows] if all(present) else None
    metric = metric or ("logit_diff" if optional["incorrect"] else "prob")
    return Task(clean=[r["prompt"] for r in rows], correct=[r["answer"] for r in rows],
                incorrect=optional["incorrect"], corrupted=optional["corrupted"], metric=metric,
                multi_token=multi_token, name=path.stem)


def _fact_row(line: str, number: int, path: Path) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
        raise ValueError(f'{path}:{number} needs string fields "prompt" and "answer", got {line.strip()[:80]}')
    return row
