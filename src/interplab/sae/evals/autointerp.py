"""Automated interpretability: an explainer labels a feature from its top contexts, a scorer
checks the label by predicting which texts activate the feature.

    explain:  the top-activating contexts, the most active token of each marked <<like this>>,
              go to a language model that answers with a one-line label (Bills et al. 2023,
              "Language models can explain neurons in language models").
    detection score: the scorer sees the label and one text at a time, half of them activating
              contexts and half non-activating ones, and answers yes or no; the score is the
              balanced accuracy of its answers (Paulo et al. 2024, "Automatically interpreting
              millions of features in large language models").
    simulation score: the scorer predicts every token's activation from the label; the score is
              the correlation with the true activations (Bills et al. 2023; see simulation.py).

All three talk to any OpenAI-compatible chat-completions endpoint through the `openai` client
(`base_url`, `model`), interplab's own server included. What is checked offline is the pipeline,
not the quality of the labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from interplab.errors import UserInputError

if TYPE_CHECKING:
    from interplab.sae.evals.simulation import SimulationScore

EXPLAIN_PROMPT = (
    "Here are text excerpts where one feature of a language model is active; the most active token is "
    "marked <<like this>>.\n\n{examples}\n\nIn one short line, what does the feature detect? Answer with "
    "the label only."
)
EXPLAIN_MAX_TOKENS = 40
"""Tokens the explainer may write (the label is the answer's first line)."""
DETECT_MAX_TOKENS = 3
"""Tokens the scorer may write for yes/no."""
DETECT_PROMPT = (
    "A feature of a language model detects: {label}\n\nText: {text}\n\nIs the feature active in this "
    "text? Answer yes or no."
)


@dataclass(frozen=True)
class Example:
    """A text excerpt as tokens, with the feature's activation on each."""

    tokens: list[str]
    acts: list[float]

    def marked(self) -> str:
        """The text with the most active token wrapped in << >>."""
        top = max(range(len(self.acts)), key=self.acts.__getitem__) if self.acts else -1
        return "".join(f"<<{t}>>" if i == top and self.acts[i] > 0 else t for i, t in enumerate(self.tokens))

    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True)
class DetectionScore:
    """How well yes/no answers from the label separate activating from non-activating texts."""

    accuracy: float
    """Balanced accuracy of the answers (0.5 = chance; an unparsed answer counts as wrong)."""
    n_unparsed: int
    """Answers that were neither yes nor no."""
    answers: list[dict]
    """Per scored text: whether it activates the feature, the raw answer and the parsed one."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Interpretation:
    """A feature's label and the scores asked for (None: not asked, or no label to score)."""

    feature: int
    label: str
    """The explainer's one-line label ('' when it answered nothing; then nothing is scored)."""
    detection: DetectionScore | None
    simulation: "SimulationScore | None"

    def to_dict(self) -> dict:
        return {"feature": self.feature, "label": self.label,
                "detection": self.detection.to_dict() if self.detection else None,
                "simulation": self.simulation.to_dict() if self.simulation else None}


def chat_client(base_url: str, *, api_key: str = "none", timeout: float = 60.0):
    """An `openai.OpenAI` client for any OpenAI-compatible endpoint."""
    try:
        from openai import OpenAI
    except ImportError as error:
        raise ImportError("automated interpretability needs `pip install openai`") from error
    return OpenAI(base_url=base_url, api_key=api_key, timeout=timeout)


class EndpointError(UserInputError):
    """The chat endpoint could not be reached, or refused a request."""


def ask(client, model: str, prompt: str, max_tokens: int) -> str:
    """One user message, greedy (temperature 0); the answer's text, stripped."""
    with _endpoint_errors(client):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0.0)
    return (reply.choices[0].message.content or "").strip()


def check_endpoint(client) -> None:
    """Refuse an endpoint that does not answer `GET /models` (one try, no retries), before any work."""
    with _endpoint_errors(client):
        client.with_options(max_retries=0).models.list()


@contextlib.contextmanager
def _endpoint_errors(client):
    """The openai client's connection and HTTP-status errors as one-line `EndpointError`s."""
    try:
        import openai
    except ImportError:  # a test's fake client, without the openai package
        yield
        return
    where = getattr(client, "base_url", "the endpoint")
    try:
        yield
    except openai.APIConnectionError as error:
        raise EndpointError(f"cannot reach an OpenAI-compatible server at {where} ({error}); start one "
                            "(e.g. `interplab serve`) or fix --base-url") from None
    except openai.APIStatusError as error:
        raise EndpointError(f"the server at {where} answered {error.status_code}: {error.message}") from None


def explain(client, model: str, examples: Sequence[Example], *, max_tokens: int = EXPLAIN_MAX_TOKENS) -> str:
    """A one-line label for the feature active in `examples` (the first line of the answer)."""
    if not examples:
        raise UserInputError("explain needs at least one activating example")
    listing = "\n".join(f"{i + 1}. {e.marked()}" for i, e in enumerate(examples))
    answer = ask(client, model, EXPLAIN_PROMPT.format(examples=listing), max_tokens)
    return (answer.splitlines() or [""])[0].strip()  # `ask` strips, so the first line is the first words


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer starting with yes, False for no, None otherwise."""
    word = answer.strip().lower().lstrip("\"'*").split(maxsplit=1)
    first = word[0].strip(".,!:") if word else ""
    return True if first == "yes" else False if first == "no" else None


def detection_score(client, model: str, label: str, positives: Sequence[Example], negatives: Sequence[Example]
                    ) -> DetectionScore:
    """Balanced accuracy of yes/no predictions of activity from the label (an unparsed answer
    counts as wrong, and is counted)."""
    if not positives or not negatives:
        raise UserInputError("detection scoring needs activating and non-activating examples")
    answers, correct = [], {True: 0, False: 0}
    for active, examples in ((True, positives), (False, negatives)):
        for example in examples:
            reply = ask(client, model, DETECT_PROMPT.format(label=label, text=example.text()), DETECT_MAX_TOKENS)
            said = parse_yes_no(reply)
            correct[active] += said is active
            answers.append({"active": active, "answer": reply, "parsed": said})
    accuracy = 0.5 * (correct[True] / len(positives) + correct[False] / len(negatives))
    return DetectionScore(accuracy, sum(a["parsed"] is None for a in answers), answers)


def interpret(client, model: str, feature: int, shown: Sequence[Example], positives: Sequence[Example],
              negatives: Sequence[Example], *, detection: bool = True, simulation: bool = True) -> Interpretation:
    """Label a feature from the `shown` activating examples, then score the label on held-out
    activating `positives` and non-activating `negatives` (detection and/or simulation)."""
    from interplab.sae.evals.simulation import simulation_score

    label = explain(client, model, shown)
    if not label:
        return Interpretation(feature, label, None, None)
    return Interpretation(
        feature, label,
        detection_score(client, model, label, positives, negatives) if detection else None,
        simulation_score(client, model, label, positives, negatives) if simulation else None)


def examples_from_index(index, feature: int, n: int) -> list[Example]:
    """Top contexts of `feature` from a FeatureIndex (`interplab sae features`) as examples."""
    return [Example(list(c.tokens), list(c.acts)) for c in index.top_contexts(feature, n)]
