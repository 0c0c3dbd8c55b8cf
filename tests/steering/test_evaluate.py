"""A/B sweep, damage and side-by-side generations on a tiny model."""

import json
from functools import lru_cache

import pytest
import torch

import interplab
from interplab.models.handle import LoadedModel
from interplab.steering.datasets import ContrastDataset, ContrastPair
from interplab.steering.evaluate import (ab_prompts, ab_scores, ab_sweep, check_scales, damage, plot_damage,
                                         plot_heatmap, plot_sweep, side_by_side, sweep_summary, write_rows)
from interplab.steering.vector import SteeringVector


@lru_cache(maxsize=None)
def ab_model():
    """The tiny llama with a word tokenizer that knows '(', 'A', 'B', ')' as separate tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import VOCAB, tiny_model

    words = ["<pad>", "<s>", "</s>", "<unk>", "(", ")", "A", "B", "Choices", ":", "?", "is", "it", "hot",
             "cold", "ice", "fire", "snow", "sun", "the", "a", "yes", "no", "."]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    handle = LoadedModel.wrap(tiny_model("llama").hf, tok)
    handle.name = "tiny-llama-ab"
    return handle


def ab_data():
    items = []
    for i, (thing, cold) in enumerate([("ice", True), ("fire", False), ("snow", True), ("sun", False)]):
        question = f"is {thing} hot ?\n\nChoices:\n(A) yes\n(B) no"
        match = "(B)" if cold else "(A)"
        items.append(ContrastPair(match, "(A)" if match == "(B)" else "(B)", question))
    return ContrastDataset(tuple(items), kind="ab", source="test")


def random_vector(layers=(0, 2), seed=0, model_id="tiny-llama-ab"):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({k: torch.randn(32, generator=g) for k in layers}, model_id=model_id)


def test_ab_score_matches_a_direct_computation():
    model = ab_model()
    prompts = ab_prompts(model, ab_data())
    assert prompts.texts[0].endswith("(") and not prompts.templated
    p_match, p_ab = ab_scores(model, prompts, batch_size=3)
    tok = model.tokenizer
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    expected = []
    for text, (match, _) in zip(prompts.texts, prompts.letters):
        with torch.no_grad():
            p = model.hf(**tok(text, return_tensors="pt")).logits[0, -1].softmax(-1)
        expected.append(float((p[a] if match == "A" else p[b]) / (p[a] + p[b])))
    assert p_match == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert 0 < p_ab < 1


def test_sweep_rows_and_baseline_shared_across_layers():
    model = ab_model()
    rows = ab_sweep(model, random_vector() * 3, ab_data(), scales=[-1, 0, 1], batch_size=2)
    assert [(r.layer, r.scale) for r in rows] == [(0, -1.0), (0, 0.0), (0, 1.0), (2, -1.0), (2, 0.0), (2, 1.0)]
    zero = [r.p_match for r in rows if r.scale == 0]
    assert zero[0] == zero[1]
    assert any(abs(r.p_match - zero[0]) > 1e-4 for r in rows if r.scale != 0)
    summary = sweep_summary(rows)
    assert set(summary) == {0, 2} and len(summary[0]["p_match"]) == 3


def test_sweep_steering_is_per_batch_correct():
    """Batches of different prompt lengths get the same score as one item at a time (the CAA
    positions are relative to each batch's prompt end)."""
    model = ab_model()
    v = random_vector(layers=(1,)) * 4
    together = ab_sweep(model, v, ab_data(), scales=[2], batch_size=4)[0].p_match
    one_by_one = ab_sweep(model, v, ab_data(), scales=[2], batch_size=1)[0].p_match
    assert together == pytest.approx(one_by_one, abs=1e-5)


def test_scales_must_be_numbers():
    assert check_scales([-2, 0, 2.5]) == [-2.0, 0.0, 2.5]
    with pytest.raises(ValueError, match="scale 'x' is not a number"):
        check_scales([1, "x"])
    with pytest.raises(ValueError, match="not a finite number"):
        check_scales([float("nan")])
    with pytest.raises(ValueError, match="non-empty list"):
        check_scales([])


@pytest.mark.wrong_types
def test_sweep_refuses_a_scale_that_is_not_a_number():
    with pytest.raises(ValueError, match="scale 'x'"):
        ab_sweep(ab_model(), random_vector(), ab_data(), scales=["x"])


def test_non_ab_items_are_refused():
    data = ContrastDataset((ContrastPair(" hot", " cold", "it is"),), kind="prompt_completion")
    with pytest.raises(ValueError, match="not an A/B item"):
        ab_sweep(ab_model(), random_vector(), data)


def test_damage_is_zero_at_zero_and_grows_with_the_scale(llama):
    v = random_vector(layers=(1,), model_id="tiny-llama")
    rows = damage(llama, v, scales=[0, 1, 4], texts=["the cat sat on the mat .", "a dog is hot"])
    by_m = {r.scale: r for r in rows}
    assert by_m[0].kl == 0 and by_m[0].delta_ce == 0
    assert 0 < by_m[1].kl < by_m[4].kl
    assert by_m[4].cross_entropy == pytest.approx(by_m[0].cross_entropy + by_m[4].delta_ce)


def test_side_by_side_uses_the_same_seed(llama):
    v = random_vector(layers=(1,), model_id="tiny-llama") * 5
    rows = side_by_side(llama, v, ["the cat"], layer=1, scales=[-1, 1], max_new_tokens=4, do_sample=True, seed=3,
                        chat=False)
    assert [r["scale"] for r in rows] == [0.0, -1.0, 1.0]
    again = interplab.generate(llama, "the cat", max_new_tokens=4, do_sample=True, seed=3, chat=False)[0]
    assert rows[0]["text"] == again


def test_tables_and_plots_are_written(tmp_path):
    rows = ab_sweep(ab_model(), random_vector(), ab_data(), scales=[-1, 0, 1])
    csv_path, json_path = write_rows(rows, tmp_path, "ab_sweep")
    assert csv_path.read_text().splitlines()[0] == "layer,scale,p_match,p_ab,n_items"
    assert len(json.loads(json_path.read_text())) == 6
    for fn, name in ((plot_sweep, "sweep.png"), (plot_heatmap, "heatmap.png")):
        assert fn(rows, tmp_path / name).stat().st_size > 1000
    drows = damage(ab_model(), random_vector(), scales=[0, 1], texts=["is it hot ?"])
    assert plot_damage(drows, tmp_path / "damage.png").stat().st_size > 1000
