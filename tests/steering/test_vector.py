"""SteeringVector: arithmetic, geometry, apply, save/load."""

import json
import warnings

import pytest
import torch

import interplab
from interplab import Positions
from interplab.steering.vector import SteeringVector, load_vector
from tests.helpers import BASELINE_HOOKS, hook_count, logits, random_ids
from tests.tiny import tiny_model


def vec(seed=0, layers=(0, 1), d=32, **meta):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({k: torch.randn(d, generator=g) for k in layers}, **meta)


def test_arithmetic_matches_the_tensors():
    v, w = vec(0), vec(1)
    for layer in (0, 1):
        torch.testing.assert_close((v + w)[layer], v[layer] + w[layer])
        torch.testing.assert_close((v - w)[layer], v[layer] - w[layer])
        torch.testing.assert_close((2.5 * v)[layer], 2.5 * v[layer])
        torch.testing.assert_close((v * 2.5)[layer], 2.5 * v[layer])
        torch.testing.assert_close((-v)[layer], -v[layer])
        torch.testing.assert_close((v / 4)[layer], v[layer] / 4)
    assert (v - v).norms() == {0: 0.0, 1: 0.0}


def test_union_of_layers_treats_missing_as_zero():
    v, w = vec(0, layers=(0,)), vec(1, layers=(1,))
    both = v + w
    assert both.layers == [0, 1]
    torch.testing.assert_close(both[1], w[1])


def test_normalisation_and_cosine():
    v = vec(0)
    assert all(abs(n - 1) < 1e-6 for n in v.normalized().norms().values())
    assert v.cosine_similarity(3 * v) == pytest.approx({0: 1.0, 1: 1.0})
    assert v.cosine_similarity(-v) == pytest.approx({0: -1.0, 1: -1.0})
    orth = SteeringVector({0: torch.tensor([1.0, 0.0])})
    assert orth.cosine_similarity(SteeringVector({0: torch.tensor([0.0, 2.0])})) == {0: 0.0}


@pytest.mark.wrong_types
def test_multiplying_by_a_string_is_refused():
    with pytest.raises(TypeError, match="multiplied by a number"):
        vec(0) * "2"


def test_bad_arithmetic_and_construction():
    with pytest.raises(ZeroDivisionError):
        vec(0) / 0
    with pytest.raises(ValueError, match="per-layer shape"):
        vec(0, d=32) + vec(1, d=16)
    with pytest.raises(ValueError, match="at least one layer"):
        SteeringVector({})
    with pytest.raises(ValueError, match="NaN"):
        SteeringVector({0: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="non-negative"):
        SteeringVector({-1: torch.ones(3)})


def test_scale_zero_and_v_minus_v_reproduce_the_baseline(llama):
    ids = random_ids()
    base = logits(llama, ids)
    v = vec(0, layers=(1,))
    with v.apply(llama, scale=0.0):
        torch.testing.assert_close(logits(llama, ids), base, atol=0, rtol=0)
    with (v - v).apply(llama, scale=3.0):
        torch.testing.assert_close(logits(llama, ids), base, atol=0, rtol=0)
    with v.apply(llama, scale=3.0):
        assert (logits(llama, ids) - base).abs().max() > 1e-3
    assert torch.equal(logits(llama, ids), base)


def test_apply_adds_scale_times_v_at_the_site(llama):
    ids = random_ids()
    v = vec(0, layers=(1,))
    site = "blocks.1.hook_resid_post"
    before = interplab.capture(llama, site, ids)[site]
    with v.apply(llama, layers=[1], scale=2.0, positions=Positions.first(3)):
        after = interplab.capture(llama, site, ids)[site]
    torch.testing.assert_close(after[:, :3] - before[:, :3], (2.0 * v[1]).expand(2, 3, 32), atol=1e-5, rtol=0)
    assert torch.equal(after[:, 3:], before[:, 3:])


def test_handle_form_and_hooks_removed(llama):
    before = hook_count(llama)
    handle = vec(0).apply(llama, scale=1.0)
    assert handle.active and hook_count(llama) > before
    handle.remove()
    assert hook_count(llama) == before
    with pytest.raises(RuntimeError):
        with vec(0).apply(llama, scale=1.0):
            raise RuntimeError("boom")
    assert hook_count(llama) == before


def test_norm_preserving_keeps_the_norm(llama):
    ids = random_ids()
    site = "blocks.1.hook_resid_post"
    base = interplab.capture(llama, site, ids)[site]
    with vec(0, layers=(1,)).apply(llama, scale=5.0, norm_preserving=True):
        new = interplab.capture(llama, site, ids)[site]
    torch.testing.assert_close(new.norm(dim=-1), base.norm(dim=-1))
    assert (new - base).abs().max() > 1e-2


def test_caa_positions_steer_the_tail_and_generated_tokens(llama):
    from interplab.steering.vector import resolve_positions

    # the tiny tokenizer has no chat template: "caa" = last prompt token onward
    assert resolve_positions(llama, "caa") == Positions.from_(-1)
    ids = random_ids(1, 6)
    site = "blocks.1.hook_resid_post"
    base = interplab.capture(llama, site, ids)[site]
    with vec(0, layers=(1,)).apply(llama, scale=1.0, positions="caa"):
        new = interplab.capture(llama, site, ids)[site]
    changed = (new - base).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False] * 5 + [True]


def test_kv_cache_and_no_cache_generate_the_same_steered_text(llama):
    v = vec(0, layers=(1,)) * 4
    kwargs = dict(max_new_tokens=6, chat=False)
    with v.apply(llama, positions="caa"):
        cached = interplab.generate(llama, ["the cat sat", "a dog"], use_cache=True, **kwargs)
    with v.apply(llama, positions="caa"):
        uncached = interplab.generate(llama, ["the cat sat", "a dog"], use_cache=False, **kwargs)
    assert cached == uncached


def test_actadd_vector_adds_row_p_at_position_p(llama):
    rows = torch.randn(2, 32)
    v = SteeringVector({1: rows}, method="actadd")
    assert v.position_aligned
    ids = random_ids(2, 5)
    site = "blocks.1.hook_resid_post"
    base = interplab.capture(llama, site, ids)[site]
    with v.apply(llama, scale=1.5, positions="actadd"):
        new = interplab.capture(llama, site, ids)[site]
    torch.testing.assert_close(new[:, :2] - base[:, :2], 1.5 * rows.expand(2, 2, 32), atol=1e-5, rtol=0)
    assert torch.equal(new[:, 2:], base[:, 2:])
    with pytest.raises(ValueError, match="position-aligned"):
        v.apply(llama, positions="all")
    with pytest.raises(ValueError, match="needs a position-aligned vector"):
        vec(0).apply(llama, positions="actadd")


def test_apply_checks_before_any_hook(llama):
    before = hook_count(llama)
    with pytest.raises(ValueError, match=r"d_model=16 \(made on big-model\).*hidden_size=32"):
        vec(0, d=16, model_id="big-model").apply(llama)
    with pytest.raises(ValueError, match="layer 7 is out of range.*3 blocks"):
        vec(0).apply(llama, layers=[7])
    with pytest.raises(ValueError, match="has 3 blocks.*made for a deeper model"):
        vec(0, layers=(0, 5)).apply(llama)
    with pytest.raises(ValueError, match="layer 2 is not in this vector"):
        vec(0).apply(llama, layers=[2])
    with pytest.raises(ValueError, match="finite"):
        vec(0).apply(llama, scale=float("inf"))
    assert hook_count(llama) == before


@pytest.mark.wrong_types
def test_apply_refuses_a_scale_that_is_not_a_number(llama):
    before = hook_count(llama)
    with pytest.raises(TypeError, match="scale must be a number"):
        vec(0).apply(llama, scale="big")
    assert hook_count(llama) == before


def test_model_id_mismatch_warns(llama):
    with pytest.warns(UserWarning, match="made on 'other-model'"):
        with vec(0, model_id="other-model").apply(llama):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with vec(0, model_id=llama.model_id).apply(llama):
            pass


def test_save_load_round_trip_is_exact(tmp_path):
    v = vec(0, layers=(0, 2), model_id="tiny-llama", model_type="llama", method="mean_diff",
            dataset_fingerprint="abc123", settings={"layers": [0, 2], "read": "last"})
    v.save(tmp_path / "v")
    back = load_vector(tmp_path / "v")
    assert back.layers == [0, 2]
    for layer in (0, 2):
        assert torch.equal(back[layer], v[layer])
    assert (back.model_id, back.model_type, back.method, back.dataset_fingerprint, back.settings) == (
        "tiny-llama", "llama", "mean_diff", "abc123", {"layers": [0, 2], "read": "last"})
    aligned = SteeringVector({1: torch.randn(3, 8)})
    aligned.save(tmp_path / "a")
    assert torch.equal(load_vector(tmp_path / "a")[1], aligned[1])


def test_saved_folder_is_readable_without_interplab(tmp_path):
    from safetensors.torch import load_file

    v = vec(0, layers=(1,))
    v.save(tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["format_version"] == 1 and config["d_model"] == 32
    tensors = load_file(str(tmp_path / "v" / "vectors.safetensors"))
    assert torch.equal(tensors[config["tensors"]["1"]], v[1])
    assert not [p for p in (tmp_path / "v").iterdir() if p.name.startswith(".")]  # no temp files left


def test_loaded_vector_for_another_width_fails_clearly(tmp_path, llama):
    vec(0, d=576, model_id="smollm2-135m-instruct").save(tmp_path / "wide")
    with pytest.raises(ValueError, match="d_model=576 .*smollm2-135m-instruct.*hidden_size=32"):
        load_vector(tmp_path / "wide").apply(llama)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no steering vector folder"):
        load_vector(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_vector(tmp_path / "empty")
    vec(0).save(tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99.*upgrade"):
        load_vector(tmp_path / "v")


def _chat_llama():
    """The tiny llama with a word-level chat template: "w1 <message> w2 w3" then header "w4 w5"."""
    import copy

    from interplab.models.handle import LoadedModel

    base = tiny_model("llama")
    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = ("{% for m in messages %}w1 {{ m['content'] }} w2 w3{% endfor %}"
                         "{% if add_generation_prompt %} w4 w5 {% endif %}")
    model = LoadedModel.wrap(base.hf, tok)
    model.name = "tiny-chat"
    return model


def _steered_positions(model, texts, positions):
    site = "blocks.1.hook_resid_post"
    batch = model.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = batch["input_ids"].tolist()
    rows = [[t for t, m in zip(r, mask) if m] for r, mask in zip(ids, batch["attention_mask"].tolist())]
    base = interplab.capture(model, site, rows, padding_side="left")
    with vec(0, layers=(1,)).apply(model, scale=1.0, positions=positions):
        new = interplab.capture(model, site, rows, padding_side="left")
    changed = (new.by_position(site) - base.by_position(site)).abs().amax(-1) > 1e-6
    return [[i for i, c in enumerate(row[:len(r)]) if c] for row, r in zip(changed.tolist(), rows)]


def test_caa_starts_after_the_chat_template_whatever_is_appended():
    from interplab.generation import format_prompt
    from interplab.steering.evaluate import ab_positions
    from interplab.steering.vector import caa_positions

    model = _chat_llama()
    header = tuple(model.tokenizer.convert_tokens_to_ids(["w2", "w3", "w4", "w5"]))
    assert caa_positions(model) == Positions.after(header, 0)  # the paper's rule is the default
    assert caa_positions(model, "caa_tail") == Positions.after(header, -4)
    assert ab_positions(model) == caa_positions(model)
    short, long = format_prompt(model, "w10"), format_prompt(model, "w10 w11 w12")  # "w1 .. w2 w3 w4 w5 "
    # nothing of the prompt itself is steered; appended tokens are, in rows of different lengths
    assert _steered_positions(model, [short, long], "caa") == [[], []]
    assert _steered_positions(model, [short + "w20 w21", long + "w20"], "caa") == [[6, 7], [8]]
    # "caa_tail" adds the template's closing and header (positions of w2 w3 w4 w5)
    assert _steered_positions(model, [short + "w20 w21", long + "w20"], "caa_tail") == \
        [[2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8]]


def test_caa_refuses_a_prompt_without_the_template():
    model = _chat_llama()
    with pytest.raises(ValueError, match="does not contain the token sequence"):
        _steered_positions(model, ["the cat sat"], "caa")
    assert hook_count(model) == BASELINE_HOOKS["llama"]
