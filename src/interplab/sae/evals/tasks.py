"""Labelled tasks built from what is on hand: the model's own tokenizer, and the CAA behaviour pairs.

Each vocabulary token that is a word (letters only after an optional leading space marker) is
one example; its activation at a site is read from the two-token prompt [BOS, token] at the
token's position (Chanin et al. 2024 read tokens inside an in-context prompt; a bare token keeps
the task cheap and the same for every SAE of a model). Labels:

    first letter        the token's first letter (the absorption task; one-vs-rest probes)
    leading space       whether the token starts a word (has the tokenizer's space marker)
    capitalised         whether its first letter is upper-case

The probing tasks are balanced (the larger class subsampled), so chance accuracy is 0.5.

CAA behaviour pairs (`caa_task`; Panickssery et al. 2024, A/B questions in the shared data
folder): each question is read twice, followed by the answer that matches the behaviour and by
the one that does not ("(A)" / "(B)", formatted as CAA extraction reads them: chat template on
the question when the model has one); the activation is read at the answer-letter token (the
position CAA's vectors are read at, `steering.extract.tokenize_completion` with read="answer");
label 1 = the answer matches the behaviour. Balanced by construction (one of each per question).
"""

from __future__ import annotations

import random

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.errors import UserInputError
from interplab.models.handle import as_loaded
from interplab.sae.evals.probing import ProbingTask
from interplab.sae.store import start_token_id

_SPACE_MARKERS = ("Ġ", "▁", " ")


def word_tokens(tokenizer, *, max_tokens: int = 4000, min_length: int = 2, seed: int = 0) -> list[tuple[int, str]]:
    """(token id, word) for vocabulary tokens that are words of letters, the leading space marker
    kept in the word as a single ' '; a seeded sample of `max_tokens` when there are more."""
    words = []
    for token, index in tokenizer.get_vocab().items():
        spaced = token.startswith(_SPACE_MARKERS)
        body = token[1:] if spaced else token
        if len(body) >= min_length and body.isascii() and body.isalpha():
            words.append((index, (" " if spaced else "") + body))
    words.sort()
    if len(words) > max_tokens:
        words = sorted(random.Random(seed).sample(words, max_tokens))
    return words


def token_activations(model, site: str, ids: list[int], *, batch_size: int = 256) -> Float[Tensor, "n d"]:
    """Activation at `site` of each token in the prompt [BOS, token] (at the token's position)."""
    from interplab.cache import capture

    model = as_loaded(model)
    bos = start_token_id(model.require_tokenizer())
    prompts = torch.tensor([[bos, i] if bos is not None else [i] for i in ids])  # (n, 2) or (n, 1)
    cache = capture(model, site, prompts, batch_size=batch_size, device="cpu", dtype=torch.float32)
    acts = cache[site]
    return acts.flatten(2)[:, -1] if acts.dim() > 3 else acts[:, -1]


def tokenizer_tasks(model, site: str, *, max_tokens: int = 4000, seed: int = 0
                    ) -> tuple[Float[Tensor, "n d"], list[str], list[ProbingTask]]:
    """Activations of the word tokens, their first letters, and the binary probing tasks
    (first letter for the five most common letters, leading space, capitalised)."""
    model = as_loaded(model)
    words = word_tokens(model.require_tokenizer(), max_tokens=max_tokens, seed=seed)
    if len(words) < 50:
        raise UserInputError(f"the tokenizer of {model.model_id} has only {len(words)} word tokens; "
                             "the tokenizer tasks need at least 50")
    acts = token_activations(model, site, [i for i, _ in words])
    letters = [w.strip()[0].lower() for _, w in words]
    tasks = []
    for letter in sorted(set(letters), key=lambda c: (-letters.count(c), c))[:5]:
        tasks.append(ProbingTask(f"first letter is {letter}", acts, torch.tensor([x == letter for x in letters]).long()))
    tasks.append(ProbingTask("leading space", acts, torch.tensor([w.startswith(" ") for _, w in words]).long()))
    tasks.append(ProbingTask("capitalised", acts, torch.tensor([w.strip()[0].isupper() for _, w in words]).long()))
    return acts, letters, [balanced(t, seed) for t in tasks if _both_classes(t.labels)]


def caa_task(model, site: str, behavior, *, n_pairs: int | None = None, chat: bool | None = None,
             batch_size: int = 16) -> ProbingTask:
    """The CAA probing task of `behavior` (a behaviour name from the shared data folder, a path to a
    CAA A/B JSON file, or an A/B `ContrastDataset`) at `site`; the first `n_pairs` questions."""
    from interplab.generation import has_chat_template
    from interplab.steering.extract import tokenize_dataset

    model = as_loaded(model)
    dataset, name = caa_dataset(behavior)
    if n_pairs is not None:
        if n_pairs < 4:
            raise UserInputError(f"n_pairs must be >= 4 (each class needs a few examples), got {n_pairs}")
        dataset = dataset[:n_pairs]
    if dataset.kind != "ab":
        raise UserInputError(f"{name}: the CAA task needs A/B questions ('(A)' / '(B)' answers), "
                             f"got {dataset.kind} pairs")
    use_chat = has_chat_template(model) if chat is None else chat
    texts = tokenize_dataset(model, dataset, read="answer", chat=use_chat)  # [pos0, neg0, pos1, ...]
    acts = torch.cat([_acts_at(model, site, texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    labels = torch.tensor([1, 0] * len(dataset))
    return ProbingTask(f"caa {name}: answer matches", acts, labels)


def _acts_at(model, site: str, texts) -> Float[Tensor, "n d"]:
    """The activation at `site` at each text's read position (its span's first token)."""
    from interplab.cache import capture

    cache = capture(model, site, [list(t.ids) for t in texts], batch_size=len(texts), padding_side="right",
                    device="cpu", dtype=torch.float32)
    acts = cache[site]
    acts = acts.flatten(2) if acts.dim() > 3 else acts  # (n, seq, width)
    return acts[torch.arange(len(texts)), torch.tensor([t.span[0] for t in texts])]  # right padding: positions hold


def caa_dataset(behavior):
    """(dataset, display name) from a ContrastDataset, a CAA file path or a behaviour name (the
    larger generate split when the shared folder has it, else the test split)."""
    from pathlib import Path

    from interplab.steering.datasets import ContrastDataset, caa_path, read_caa

    if isinstance(behavior, ContrastDataset):
        return behavior, Path(behavior.source).parent.name or "pairs"
    path = Path(behavior)
    if not path.is_file():
        try:
            path = caa_path(str(behavior), "generate")
        except ValueError:
            path = caa_path(str(behavior), "test")
    return read_caa(path, skip_invalid=True), path.parent.name


def balanced(task: ProbingTask, seed: int = 0) -> ProbingTask:
    """The task with the larger class subsampled to the size of the smaller (chance = 0.5, as in
    SAEBench), so that accuracy is not the share of the majority class."""
    generator = torch.Generator().manual_seed(seed)
    groups = [(task.labels == value).nonzero()[:, 0] for value in (0, 1)]
    n = min(len(g) for g in groups)
    keep = torch.cat([g[torch.randperm(len(g), generator=generator)[:n]] for g in groups]).sort().values
    return ProbingTask(task.name, task.acts[keep], task.labels[keep])


def _both_classes(labels: Tensor) -> bool:
    counts = torch.bincount(labels, minlength=2)
    return int(counts.min()) >= 10
