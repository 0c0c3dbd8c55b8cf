"""Simulation scoring of a feature's label (Bills et al. 2023, "Language models can explain
neurons in language models"; as in SAEBench and EleutherAI's delphi).

A scorer model reads the label and one context at a time and predicts, for every token, how
strongly the feature fires there, as an integer from 0 to 10. The score is the Pearson
correlation between predicted and true activations over all tokens of all scored contexts,
activating (top) and non-activating (random) ones together:

    score = corr( concat_c predicted_c , concat_c true_c )        c over the parsed contexts

Bills et al. call this the correlation score of the "all at once" simulator and use the true
activations as they are (the correlation does not depend on their scale). They read the
predicted activation as the expected value over the scorer's probabilities of "0".."10";
an OpenAI-compatible chat endpoint need not return probabilities, so here the scorer writes
its integers out and they are parsed.

The prompt (`SIMULATE_PROMPT`) lists the context's tokens one per line as `index<TAB>"token"`
(the token JSON-quoted, so spaces and newlines show) and asks for exactly one line
`index<TAB>activation` per token. An answer is parsed (`parse_activations`) when either
  - lines `index<sep>value` (sep: tabs or spaces, ':', '=', ',', ')' or '.'; the quoted
    token may be echoed between them) give every index 1..n exactly once, other lines ignored, or
  - the answer holds exactly n numbers and nothing else numeric (a bare list "0 0 7 0"),
and every value lies in [0, 10]. Anything else is *unparsed*: the context is left out of the
correlation, counted in `n_unparsed` and its answer kept in `unparsed`; nothing is zero-filled.
The correlation is None (with the reason) when no context parsed or either side is constant
(a scorer that predicts 0 everywhere carries no information, and Pearson's r is undefined).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from interplab.errors import UserInputError
from interplab.sae.evals.autointerp import Example, ask

MAX_LEVEL = 10
"""Predicted activations are integers 0..MAX_LEVEL."""

SIMULATE_PROMPT = (
    "A feature of a language model detects: {label}\n\n"
    "Here is a text split into {n} tokens, one per line as index<TAB>token:\n{listing}\n\n"
    "For each token, predict how strongly the feature is active on it, as an integer from 0 (not active) "
    "to 10 (most active). Answer with exactly {n} lines of the form index<TAB>activation, one per token in "
    "order, and nothing else."
)
# "index<sep>value" on one line, the token optionally echoed JSON-quoted between them
_SEP = r'(?:[ \t]*[:=,).][ \t]*|[ \t]+)'  # no '-': "1\t-1" is index 1, value -1 (out of range)
_PAIR = re.compile(rf'^[ \t]*(\d+){_SEP}(?:"(?:[^"\\]|\\.)*"{_SEP})?(-?\d+(?:\.\d+)?)[ \t]*$', re.M)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class SimulatedContext:
    """One scored context: true activations and, when the answer parsed, the predicted ones."""

    active: bool
    """Whether it is an activating (top) context or a random non-activating one."""
    true: list[float]
    predicted: list[float] | None
    """None when the answer did not parse."""
    answer: str
    """The scorer's raw answer."""


@dataclass(frozen=True)
class SimulationScore:
    """Correlation between simulated and true activations (see the module docstring)."""

    correlation: float | None
    """Pearson's r over all tokens of the parsed contexts; None when undefined (see `reason`)."""
    reason: str
    """Why the correlation is None ('' when it is a number)."""
    n_contexts: int
    n_tokens: int
    """Tokens in the parsed contexts (those the correlation is over)."""
    n_unparsed: int
    """Contexts whose answer did not parse (left out of the correlation)."""
    contexts: list[SimulatedContext]

    def to_dict(self) -> dict:
        return asdict(self)


def simulation_prompt(label: str, example: Example) -> str:
    listing = "\n".join(f"{i + 1}\t{json.dumps(token)}" for i, token in enumerate(example.tokens))
    return SIMULATE_PROMPT.format(label=label, n=len(example.tokens), listing=listing)


def parse_activations(answer: str, n: int) -> list[float] | None:
    """The n predicted activations in `answer`, or None if it does not parse (module docstring)."""
    pairs = _PAIR.findall(answer)
    indices = [int(i) for i, _ in pairs]
    if sorted(indices) == list(range(1, n + 1)):
        values = [float(v) for _, v in sorted(pairs, key=lambda pair: int(pair[0]))]
    else:
        numbers = _NUMBER.findall(answer)
        if len(numbers) != n:
            return None
        values = [float(v) for v in numbers]
    return values if all(0 <= v <= MAX_LEVEL for v in values) else None


def simulation_max_tokens(n: int) -> int:
    """Room for n lines "index<TAB>value" (a few tokens each) and a little more."""
    return 4 * n + 8


def simulate(client, model: str, label: str, example: Example, *, active: bool) -> SimulatedContext:
    """Ask the scorer for per-token activations of one context."""
    n = len(example.tokens)
    answer = ask(client, model, simulation_prompt(label, example), max_tokens=simulation_max_tokens(n))
    return SimulatedContext(active, list(example.acts), parse_activations(answer, n), answer)


def simulation_score(client, model: str, label: str, positives: Sequence[Example], negatives: Sequence[Example]
                     ) -> SimulationScore:
    """Correlation score of `label` on activating `positives` and non-activating `negatives`."""
    if not positives or not negatives:
        raise UserInputError("simulation scoring needs activating and non-activating examples")
    if any(not e.tokens or len(e.tokens) != len(e.acts) for e in (*positives, *negatives)):
        raise UserInputError("every example needs one activation per token, and at least one token")
    contexts = [simulate(client, model, label, e, active=True) for e in positives]
    contexts += [simulate(client, model, label, e, active=False) for e in negatives]
    return score_contexts(contexts)


def score_contexts(contexts: Sequence[SimulatedContext]) -> SimulationScore:
    """The correlation over the parsed contexts, with the unparsed ones counted."""
    parsed = [c for c in contexts if c.predicted is not None]
    predicted = [v for c in parsed for v in c.predicted]
    true = [v for c in parsed for v in c.true]
    correlation, reason = pearson(predicted, true)
    if not parsed:
        reason = "no answer parsed"
    return SimulationScore(correlation, reason, len(contexts), len(true), len(contexts) - len(parsed), list(contexts))


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, str]:
    """(Pearson's r, '') or (None, why it is undefined)."""
    if len(x) < 2:
        return None, "fewer than 2 tokens"
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0:
        return None, "the predicted activations are constant"
    if syy == 0:
        return None, "the true activations are constant"
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sxx * syy), ""
