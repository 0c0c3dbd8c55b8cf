"""Automated interpretability end to end against an OpenAI-compatible server started in the test
(a local model really generating): the pipeline, not the quality of the labels."""

from __future__ import annotations

import pytest

from interplab.errors import UserInputError
from interplab.sae.evals.autointerp import Example, chat_client, detection_score, explain, interpret, parse_yes_no
from tests.decomp.local_server import local_server
from tests.tiny import tiny_model

POSITIVES = [Example(["the", " cat", " sat"], [0.0, 2.0, 0.1]), Example(["a", " cat", " is"], [0.0, 1.5, 0.0]),
             Example(["the", " cat", "."], [0.0, 1.0, 0.0]), Example(["cat", " on", " mat"], [0.8, 0.0, 0.0])]
NEGATIVES = [Example(["the", " dog", " sat"], [0.0, 0.0, 0.0]), Example(["hot", " weather"], [0.0, 0.0])]


def test_marked_example_and_answer_parsing():
    assert POSITIVES[0].marked() == "the<< cat>> sat"
    assert NEGATIVES[0].marked() == "the dog sat"
    assert [parse_yes_no(a) for a in ("Yes.", "no", "'No, it is not'", "maybe")] == [True, False, False, None]
    with pytest.raises(UserInputError):
        explain(None, "m", [])


def test_pipeline_against_a_local_server_with_a_tiny_model():
    with local_server(tiny_model("llama")) as (url, app):
        client = chat_client(url)
        result = interpret(client, "tiny", 7, POSITIVES, NEGATIVES)
        requests = list(app.state.requests)
    assert len(requests) == 1 + 2 + len(NEGATIVES)  # one explanation, then one question per scored text
    explain_prompt, generated = requests[0]
    assert "<< cat>>" in explain_prompt and result.label == generated.strip().splitlines()[0].strip()
    assert all(result.label in prompt for prompt, _ in requests[1:])
    assert [a["active"] for a in result.answers] == [True, True, False, False]
    assert 0.0 <= result.detection_accuracy <= 1.0


@pytest.mark.slow
def test_pipeline_with_the_default_model(smollm):
    with local_server(smollm) as (url, _):
        client = chat_client(url)
        label = explain(client, "smollm2", POSITIVES[:2])
        accuracy, answers = detection_score(client, "smollm2", label, POSITIVES[2:], NEGATIVES)
    print(f"\nlabel {label!r}; detection accuracy {accuracy:.2f}; answers {[a['answer'] for a in answers]}")
    assert label
    assert sum(a["parsed"] is not None for a in answers) >= len(answers) // 2  # it mostly answers yes/no
