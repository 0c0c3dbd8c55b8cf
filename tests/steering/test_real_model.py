"""The default model (SmolLM2-135M-Instruct): steering changes behaviour, measured by probabilities.

Slow (real model); the model is loaded once by the session fixture `smollm`.
"""

import pytest
import torch

from interplab.steering.demo import COLD_WORDS, HOT_WORDS, DEMO_PROMPT, cold_hot_pairs, hot_cold_ab, run_demo, word_probabilities
from interplab.steering.evaluate import ab_sweep, damage, sweep_summary
from interplab.steering.extract import extract_vector

pytestmark = pytest.mark.slow
MIDDLE = 10  # of 30 blocks


@pytest.fixture(scope="module")
def cold_vector(smollm):
    return extract_vector(smollm, cold_hot_pairs(), layers=[MIDDLE], read="mean", holdout=0.0, chat=False).vector


def test_cold_minus_hot_raises_cold_words_and_the_opposite_sign_lowers_them(smollm, cold_vector):
    base_cold, base_hot = word_probabilities(smollm, DEMO_PROMPT, COLD_WORDS, HOT_WORDS)
    with cold_vector.apply(smollm, layers=[MIDDLE], scale=2.0):
        cold_up, hot_up = word_probabilities(smollm, DEMO_PROMPT, COLD_WORDS, HOT_WORDS)
    with cold_vector.apply(smollm, layers=[MIDDLE], scale=-2.0):
        cold_down, hot_down = word_probabilities(smollm, DEMO_PROMPT, COLD_WORDS, HOT_WORDS)
    assert cold_up > 3 * base_cold, (base_cold, cold_up)
    assert cold_down < 0.5 * base_cold, (base_cold, cold_down)
    share = lambda c, h: c / (c + h)  # noqa: E731
    assert share(cold_up, hot_up) > share(base_cold, base_hot) + 0.2
    assert share(cold_down, hot_down) < share(base_cold, base_hot)


def test_damage_grows_with_the_scale(smollm, cold_vector):
    rows = {r.scale: r for r in damage(smollm, cold_vector, scales=[0, 2, 8], batch_size=8)}
    assert rows[0].delta_ce == 0 and 0 < rows[2].kl < rows[8].kl
    assert rows[8].delta_ce > rows[2].delta_ce


def test_demo_runs_and_reports_probabilities(smollm):
    lines = []
    result = run_demo(smollm, scales=[3.0], max_new_tokens=6, out=lines.append)
    assert [r.scale for r in result.rows] == [0.0, 3.0]
    assert result.rows[1].p_cold > result.rows[0].p_cold
    assert any(line.startswith("[baseline] The weather in California is") for line in lines)


def test_ab_score_moves_with_the_scale(smollm):
    """SmolLM2-135M is at chance on every balanced A/B set we tried (docs/steering.md), so this
    set keeps the cold answer in (A): the score then measures a letter preference the model
    does have (p_match ~0.29 at baseline), and the CAA vector moves it monotonically."""
    data = hot_cold_ab(balanced=False)
    train, test = data[:12], data[12:]
    vector = extract_vector(smollm, train, layers=[16], holdout=0.0).vector
    rows = ab_sweep(smollm, vector, test, layers=[16], scales=[-1, 0, 1, 2], positions="caa")
    scores = sweep_summary(rows)[16]["p_match"]
    assert all(b > a + 0.05 for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] - scores[0] > 0.3, scores
