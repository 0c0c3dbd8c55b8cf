"""Automated interpretability: the simulation score on planted scorers (fake, deterministic
clients), and the whole pipeline end to end (`interplab sae explain`) against interplab's own
server started in the test: the pipeline, not the quality of the labels."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from interplab.errors import UserInputError
from interplab.sae.evals.autointerp import Example, check_endpoint, chat_client, explain, interpret, parse_yes_no
from interplab.sae.evals.simulation import parse_activations, pearson, simulation_prompt, simulation_score

runner = CliRunner()

POSITIVES = [Example(["the", " cat", " sat"], [0.0, 2.0, 0.1]), Example(["a", " cat", " is"], [0.0, 1.5, 0.0]),
             Example(["the", " cat", "."], [0.0, 1.0, 0.0]), Example(["cat", " on", " mat"], [0.8, 0.0, 0.0])]
NEGATIVES = [Example(["the", " dog", " sat"], [0.0, 0.0, 0.0]), Example(["hot", " weather"], [0.0, 0.0])]


# --- fake scorers ---------------------------------------------------------------------------------

class FakeClient:
    """An OpenAI-shaped client whose answer is `answer(prompt)`; it records every prompt."""

    base_url = "fake://"

    def __init__(self, answer) -> None:
        self.prompts: list[str] = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))
        self._answer = answer

    def _create(self, *, model, messages, max_tokens, temperature):
        prompt = messages[0]["content"]
        self.prompts.append(prompt)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=self._answer(prompt)))])


def listed_tokens(prompt: str) -> list[str]:
    """The tokens a simulation prompt lists (index<TAB>"token" lines)."""
    return [json.loads(t) for t in re.findall(r'^\d+\t(".*")$', prompt, re.M)]


def oracle(examples):
    """A scorer that knows the true activations (integers here, so it can say them exactly)."""
    truth = {"".join(e.tokens): e.acts for e in examples}

    def answer(prompt):
        acts = truth["".join(listed_tokens(prompt))]
        return "\n".join(f"{i + 1}\t{int(a)}" for i, a in enumerate(acts))

    return answer


def planted_examples(n=20, length=16, seed=0):
    """Activating contexts (integer activations 0..10 on a few tokens) and silent ones."""
    rng = random.Random(seed)
    words = [f" w{i}" for i in range(200)]
    positives = []
    for _ in range(n):
        acts = [float(rng.choice([0, 0, 0, 3, 7, 10])) for _ in range(length)]
        positives.append(Example([rng.choice(words) for _ in range(length)], acts))
    negatives = [Example([rng.choice(words) for _ in range(length)], [0.0] * length) for _ in range(n)]
    return positives, negatives


def test_simulation_prompt_and_parsing():
    prompt = simulation_prompt("cats", POSITIVES[0])
    assert "detects: cats" in prompt and 'split into 3 tokens' in prompt
    assert listed_tokens(prompt) == ["the", " cat", " sat"]
    assert parse_activations("1\t0\n2\t10\n3\t4", 3) == [0.0, 10.0, 4.0]
    assert parse_activations('Here you go:\n2: 7\n1: 0\n3: 1', 3) == [0.0, 7.0, 1.0]  # any order, prose ignored
    assert parse_activations('1\t"the"\t0\n2\t" cat"\t9\n3\t" sat"\t0', 3) == [0.0, 9.0, 0.0]  # token echoed
    assert parse_activations("0 9 0", 3) == [0.0, 9.0, 0.0]  # a bare list of exactly n numbers
    for garbage in ("1\t0\n2\t11\n3\t0", "1\t0\n3\t0", "1\t0\n1\t2\n3\t0", "no idea", "0 9", "1\t-1\n2\t0\n3\t0"):
        assert parse_activations(garbage, 3) is None, garbage


def test_an_oracle_scorer_correlates_perfectly():
    positives, negatives = planted_examples()
    score = simulation_score(FakeClient(oracle(positives + negatives)), "m", "w-things", positives, negatives)
    assert score.n_unparsed == 0 and score.n_contexts == 40 and score.n_tokens == 40 * 16
    assert score.correlation == pytest.approx(1.0, abs=1e-12)
    assert [c.active for c in score.contexts] == [True] * 20 + [False] * 20


def test_a_noise_scorer_correlates_near_zero():
    positives, negatives = planted_examples()
    rng = random.Random(1)

    def noise(prompt):
        return "\n".join(f"{i + 1}\t{rng.randint(0, 10)}" for i in range(len(listed_tokens(prompt))))

    score = simulation_score(FakeClient(noise), "m", "w-things", positives, negatives)
    assert score.n_unparsed == 0
    assert abs(score.correlation) < 0.15  # 640 tokens: the standard error of r is ~0.04


def test_garbage_answers_are_reported_unparsed_never_zero_filled():
    positives, negatives = planted_examples(n=4)
    score = simulation_score(FakeClient(lambda prompt: "The feature is about words."), "m", "x", positives, negatives)
    assert score.correlation is None and score.reason == "no answer parsed"
    assert score.n_unparsed == 8 and score.n_tokens == 0
    assert all(c.predicted is None and c.answer == "The feature is about words." for c in score.contexts)

    truth = oracle(positives)
    half = FakeClient(lambda p: truth(p) if "".join(listed_tokens(p)) in {"".join(e.tokens) for e in positives}
                      else "nope")  # parses on the activating contexts only
    score = simulation_score(half, "m", "x", positives, negatives)
    assert score.n_unparsed == 4 and score.n_tokens == 4 * 16  # the correlation is over the parsed ones only
    assert score.correlation == pytest.approx(1.0)


def test_constant_predictions_have_no_correlation():
    positives, negatives = planted_examples(n=3)
    zeros = FakeClient(lambda p: "\n".join(f"{i + 1}\t0" for i in range(len(listed_tokens(p)))))
    score = simulation_score(zeros, "m", "x", positives, negatives)
    assert score.correlation is None and "constant" in score.reason and score.n_unparsed == 0
    assert pearson([1, 2, 3], [2, 4, 6])[0] == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)


def test_marked_example_and_answer_parsing():
    assert POSITIVES[0].marked() == "the<< cat>> sat"
    assert NEGATIVES[0].marked() == "the dog sat"
    assert [parse_yes_no(a) for a in ("Yes.", "no", "'No, it is not'", "maybe")] == [True, False, False, None]
    with pytest.raises(UserInputError):
        explain(None, "m", [])
    with pytest.raises(UserInputError, match="non-activating"):
        simulation_score(FakeClient(str), "m", "x", POSITIVES, [])


def test_interpret_labels_then_scores_with_the_label():
    def answer(prompt):
        if prompt.startswith("Here are text excerpts"):
            return "the word cat\nmore text"
        if "Answer yes or no" in prompt:
            return "Yes" if "cat" in prompt.split("Text:")[1] else "maybe"
        return oracle(POSITIVES + NEGATIVES)(prompt)

    client = FakeClient(answer)
    result = interpret(client, "m", 3, POSITIVES[:2], POSITIVES[2:], NEGATIVES)
    assert result.label == "the word cat"
    assert all("detects: the word cat" in p for p in client.prompts[1:])
    assert result.detection.accuracy == 0.5 and result.detection.n_unparsed == 2  # "maybe" counts as wrong
    assert result.simulation.n_unparsed == 0 and result.simulation.n_contexts == 4
    silent = interpret(FakeClient(lambda p: ""), "m", 3, POSITIVES[:2], POSITIVES[2:], NEGATIVES)
    assert silent.label == "" and silent.detection is None and silent.simulation is None


def test_an_unreachable_endpoint_is_one_clear_error():
    from interplab.sae.evals.autointerp import EndpointError

    with pytest.raises(EndpointError, match="cannot reach an OpenAI-compatible server at http://127.0.0.1:9/"):
        check_endpoint(chat_client("http://127.0.0.1:9/v1", timeout=2))


# --- end to end against `interplab serve` ---------------------------------------------------------

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def sparse_sae(tinystories, tmp_path_factory):
    """A ReLU SAE on TinyStories-656K whose latents fire rarely (a negative threshold), saved with
    its feature index (short windows, so the prompts fit the model's 512 positions)."""
    from interplab.sae.config import SAEConfig
    from interplab.sae.features import build_feature_index
    from interplab.sae.formats import save_sae
    from interplab.sae.model import SAE
    from tests.serve.conftest import _sample

    folder = tmp_path_factory.mktemp("explain")
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, d_sae=32, family="relu", site=SITE, model_id=tinystories.model_id,
                        normalize_input=False, subtract_decoder_bias=False), generator=g)
    texts = [line for line in open(_sample(), encoding="utf-8").read().split("\n") if line.strip()][:300]
    x = tinystories_acts(tinystories, texts[:12])
    with torch.no_grad():  # threshold each latent at its 97th percentile: sparse, but active somewhere
        sae.b_enc.copy_(-(x @ sae.W_enc).quantile(0.97, dim=0))
    save_sae(sae, folder / "sae")
    build_feature_index(tinystories, sae, texts, folder / "features.db", n_contexts=48, context_length=12,
                        n_top=6, n_bins=8, sae_path=str(folder / "sae")).close()
    return sae, folder / "sae", folder / "features.db"


def tinystories_acts(model, texts):
    from interplab.cache import capture

    acts = capture(model, SITE, texts, device="cpu", dtype=torch.float32)[SITE]
    return acts.reshape(-1, acts.shape[-1])


@pytest.fixture(scope="module")
def server(tinystories):
    from tests.serve.conftest import start

    running, _ = start(tinystories, gather_s=0.01, max_tokens=128)
    yield running
    running.stop()


def test_negatives_are_silent_and_recomputed_like_the_index(tinystories, sparse_sae):
    from interplab.sae.evals.autointerp_run import feature_examples, window_activations
    from interplab.sae.features import FeatureIndex

    sae, _, db = sparse_sae
    with FeatureIndex(db, sae=sae) as index:
        top = index.top_contexts(0)
        rows = index.db.execute("SELECT id, tokens FROM contexts WHERE id = ?", (top[0].context,)).fetchone()
        recomputed = window_activations(tinystories, sae, index, torch.tensor([json.loads(rows[1])]), 0)[0]
        torch.testing.assert_close(recomputed, torch.tensor(top[0].acts), atol=2e-3, rtol=2e-3)  # index: float16
        got = feature_examples(tinystories, sae, index, 0, n_shown=3, n_scored=2, seed=0)
    assert len(got.shown) == 3 and len(got.positives) == 2 and len(got.negatives) == 2
    assert all(max(e.acts) == 0 for e in got.negatives) and all(max(e.acts) > 0 for e in got.positives)


def test_a_model_the_index_was_not_built_with_is_refused(sparse_sae, llama, tinystories, tmp_path):
    import contextlib
    import shutil
    import sqlite3

    from interplab.sae.evals.autointerp_run import explain_features
    from interplab.sae.features import FeatureIndex

    sae, _, db = sparse_sae
    client = FakeClient(str)
    with FeatureIndex(db, sae=sae) as index, pytest.raises(ValueError, match="d_in=128"):
        explain_features(client, "m", llama, sae, index, [0])  # the tiny llama is 32 wide
    other = shutil.copy(db, tmp_path / "other_tokenizer.db")  # as if another tokenizer had decoded the windows
    with contextlib.closing(sqlite3.connect(other)) as connection, connection:
        connection.execute("UPDATE vocab SET text = 'zzz' WHERE id = (SELECT MIN(id) FROM vocab)")
    with FeatureIndex(other, sae=sae) as index, pytest.raises(UserInputError, match="another tokenizer"):
        explain_features(client, "m", tinystories, sae, index, [0])
    assert client.prompts == []  # refused before any request


def test_explain_end_to_end_against_interplab_serve(tinystories, sparse_sae, server, tmp_path):
    """`interplab sae explain` through the openai client against the server: labels are the model's
    own words, scores are numbers in range, unparsed answers are counted."""
    from interplab.cli import app
    from interplab.generation import generate

    _, sae_dir, db = sparse_sae
    out = tmp_path / "explained"
    args = ["sae", "explain", str(sae_dir), "--index", str(db), "--features", "0,3", "--base-url",
            f"{server.url}/v1", "--explainer", "tinystories", "-o", str(out),
            "--n-shown", "3", "--n-scored", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "explanations.json").read_text())
    print(result.output)  # with -s: what the tiny model wrote (the pipeline is checked, not the quality)
    assert [f["feature"] for f in data["features"]] == [0, 3]
    assert data["settings"]["prompts"]["simulate"].startswith("A feature of a language model detects")
    for row in data["features"]:
        assert isinstance(row["label"], str) and row["label"].strip()
        det, sim = row["detection"], row["simulation"]
        assert 0.0 <= det["accuracy"] <= 1.0 and det["n_unparsed"] == sum(a["parsed"] is None for a in det["answers"])
        assert sim["n_contexts"] == 4 and sim["n_unparsed"] == sum(c["predicted"] is None for c in sim["contexts"])
        assert sim["correlation"] is None or -1.0 <= sim["correlation"] <= 1.0
        assert (sim["correlation"] is None) == bool(sim["reason"])
        assert row["n_shown"] == 3 and row["n_positives"] == 2 and row["n_negatives"] == 2
    # the first label is what the served model writes for the explain prompt (greedy, first line)
    from interplab.sae.evals.autointerp import EXPLAIN_PROMPT
    from interplab.sae.features import FeatureIndex

    with FeatureIndex(db) as index:
        shown = [Example(list(c.tokens), list(c.acts)) for c in index.top_contexts(0)[:3]]
    prompt = EXPLAIN_PROMPT.format(examples="\n".join(f"{i + 1}. {e.marked()}" for i, e in enumerate(shown)))
    alone = generate(tinystories, prompt, max_new_tokens=40, chat=False)[0].strip().splitlines()[0].strip()
    assert data["features"][0]["label"] == alone
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    unreachable = [("http://127.0.0.1:9/v1" if a == f"{server.url}/v1" else a) for a in args]
    refused = runner.invoke(app, unreachable + ["--overwrite"])
    assert refused.exit_code == 2 and "cannot reach" in refused.stderr
    assert (out / "explanations.json").is_file()  # a refused --overwrite run keeps the old output


@pytest.mark.parametrize("case, message", [
    ("feature", "feature 32 is out of range: the SAE has 32 latents"),
    ("other_sae", "was built from"),
    ("server", "cannot reach an OpenAI-compatible server"),
    ("key", "--api-key-env NO_SUCH_KEY_VAR: that environment variable is not set"),
])
def test_explain_bad_input_is_one_line_exit_2(sparse_sae, tmp_path, case, message):
    from interplab.cli import app
    from interplab.sae.formats import save_sae
    from interplab.sae.model import SAE

    sae, sae_dir, db = sparse_sae
    if case == "other_sae":
        other = SAE(sae.cfg, generator=torch.Generator().manual_seed(1))
        save_sae(other, tmp_path / "other")
        sae_dir = tmp_path / "other"
    args = ["sae", "explain", str(sae_dir), "--index", str(db), "--features", "32" if case == "feature" else "0",
            "--base-url", "http://127.0.0.1:9/v1", "--explainer", "x", "-o", str(tmp_path / "out")]
    if case == "key":
        args += ["--api-key-env", "NO_SUCH_KEY_VAR"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_with_the_default_model_behind_interplab_serve(smollm):
    """SmolLM2-135M-Instruct as explainer and scorer behind `interplab serve` (chat template on):
    the pipeline with a model that follows instructions a little; prints what it said."""
    from tests.serve.conftest import start

    running, _ = start(smollm, gather_s=0.01, max_tokens=128)
    try:
        client = chat_client(f"{running.url}/v1")
        check_endpoint(client)
        result = interpret(client, "smollm2", 7, POSITIVES[:2], POSITIVES[2:], NEGATIVES)
    finally:
        running.stop()
    sim = result.simulation
    print(f"\nlabel {result.label!r}; detection {result.detection.accuracy:.2f} "
          f"({result.detection.n_unparsed} unparsed, answers {[a['answer'] for a in result.detection.answers]}); "
          f"simulation r {sim.correlation} ({sim.n_unparsed}/{sim.n_contexts} unparsed: {sim.reason or 'ok'}); "
          f"first simulation answer {sim.contexts[0].answer!r}")
    assert result.label.strip()
    assert result.detection.n_unparsed <= len(result.detection.answers) // 2  # it mostly answers yes/no
    assert sim.n_contexts == 4 and sim.n_unparsed == sum(c.predicted is None for c in sim.contexts)
