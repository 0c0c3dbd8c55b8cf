"""Small tasks over the tiny models' word vocabulary (w0..w79, the, cat, ...)."""

from __future__ import annotations

import random

from interplab.analysis.tasks import Task


def tiny_task(n: int = 4, *, seed: int = 0, length: int = 6, changed: int = 3, metric: str = "logit_diff") -> Task:
    """Clean prompts of `length` random words; the corrupted prompt swaps word `changed` for another.
    Mark "X" is the changed word."""
    rng = random.Random(seed)
    clean, corrupted, marks = [], [], []
    for _ in range(n):
        words = [f"w{rng.randrange(4, 80)}" for _ in range(length)]
        other = list(words)
        other[changed] = f"w{rng.randrange(4, 80)}" if words[changed] != "w3" else "w4"
        while other[changed] == words[changed]:
            other[changed] = f"w{rng.randrange(4, 80)}"
        clean.append(" ".join(words))
        corrupted.append(" ".join(other))
        marks.append(len(" ".join(words[:changed])) + (1 if changed else 0))
    answers = [(f"w{rng.randrange(4, 40)}", f"w{rng.randrange(40, 80)}") for _ in range(n)]  # differ per prompt
    incorrect = [b for _, b in answers] if metric == "logit_diff" else None
    return Task(clean=clean, correct=[a for a, _ in answers], incorrect=incorrect, corrupted=corrupted,
                metric=metric, marks={"X": marks}, name="tiny")
