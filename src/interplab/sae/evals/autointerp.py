"""Automated interpretability: an explainer labels a feature from its top contexts, a scorer
checks the label by predicting which texts activate the feature.

    explain:  the top-activating contexts, the most active token of each marked <<like this>>,
              go to a language model that answers with a one-line label (Bills et al. 2023,
              "Language models can explain neurons in language models").
    detection score: the scorer sees the label and one text at a time, half of them activating
              contexts and half non-activating ones, and answers yes or no; the score is the
              balanced accuracy of its answers (Paulo et al. 2024, "Automatically interpreting
              millions of features in large language models").

Both talk to any OpenAI-compatible chat-completions endpoint through the `openai` client
(`base_url`, `model`), interplab's own server included. What is checked offline is the pipeline,
not the quality of the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from interplab.errors import UserInputError

EXPLAIN_PROMPT = (
    "Here are text excerpts where one feature of a language model is active; the most active token is "
    "marked <<like this>>.\n\n{examples}\n\nIn one short line, what does the feature detect? Answer with "
    "the label only."
)
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
class Interpretation:
    """A feature's label and its detection score."""

    feature: int
    label: str
    detection_accuracy: float
    """Balanced accuracy of the scorer's yes/no answers (0.5 = chance)."""
    answers: list[dict]
    """Per scored text: whether it activates the feature and what the scorer answered."""

    def to_dict(self) -> dict:
        return asdict(self)


def chat_client(base_url: str, *, api_key: str = "none", timeout: float = 60.0):
    """An `openai.OpenAI` client for any OpenAI-compatible endpoint."""
    try:
        from openai import OpenAI
    except ImportError as error:
        raise ImportError("automated interpretability needs `pip install openai`") from error
    return OpenAI(base_url=base_url, api_key=api_key, timeout=timeout)


def _ask(client, model: str, prompt: str, max_tokens: int) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0.0)
    return (reply.choices[0].message.content or "").strip()


def explain(client, model: str, examples: Sequence[Example], *, max_tokens: int = 40) -> str:
    """A one-line label for the feature active in `examples` (the first line of the answer)."""
    if not examples:
        raise UserInputError("explain needs at least one activating example")
    listing = "\n".join(f"{i + 1}. {e.marked()}" for i, e in enumerate(examples))
    answer = _ask(client, model, EXPLAIN_PROMPT.format(examples=listing), max_tokens)
    return (answer.splitlines() or [""])[0].strip()


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer starting with yes, False for no, None otherwise."""
    word = answer.strip().lower().lstrip("\"'*").split(maxsplit=1)
    first = word[0].strip(".,!:") if word else ""
    return True if first == "yes" else False if first == "no" else None


def detection_score(client, model: str, label: str, positives: Sequence[Example], negatives: Sequence[Example]
                    ) -> tuple[float, list[dict]]:
    """Balanced accuracy of yes/no predictions of activity from the label (an unparsable answer
    counts as wrong)."""
    if not positives or not negatives:
        raise UserInputError("detection scoring needs activating and non-activating examples")
    answers, correct = [], {True: 0, False: 0}
    for active, examples in ((True, positives), (False, negatives)):
        for example in examples:
            reply = _ask(client, model, DETECT_PROMPT.format(label=label, text=example.text()), 3)
            said = parse_yes_no(reply)
            correct[active] += said is active
            answers.append({"active": active, "answer": reply, "parsed": said})
    accuracy = 0.5 * (correct[True] / len(positives) + correct[False] / len(negatives))
    return accuracy, answers


def interpret(client, model: str, feature: int, positives: Sequence[Example], negatives: Sequence[Example], *,
              n_explain: int | None = None) -> Interpretation:
    """Label a feature from its activating examples (the first `n_explain` of them; the rest, if
    any, are scored) and score the label on held-out positives and the negatives."""
    n = len(positives) // 2 if n_explain is None else n_explain
    shown, held_out = list(positives[:n]) or list(positives), list(positives[n:]) or list(positives)
    label = explain(client, model, shown)
    accuracy, answers = detection_score(client, model, label, held_out, negatives)
    return Interpretation(feature, label, accuracy, answers)


def examples_from_index(index, feature: int, n: int) -> list[Example]:
    """Top contexts of `feature` from a FeatureIndex (`interplab sae features`) as examples."""
    return [Example(list(c.tokens), list(c.acts)) for c in index.top_contexts(feature, n)]
