"""Device defaults, models spread with a device_map, references moved to each activation's device
and dtype (checked on CPU with a disk-offloaded block and with 'meta' tensors as a stand-in for a
second device; tests/gpu/ repeats the equalities across real GPUs)."""

from __future__ import annotations

import pytest
import torch

import interplab
from interplab.devices import Copies
from interplab.hooks import HookContext, PositionTracker
from interplab.interventions import add_vector, intervene, mean_ablate, patch, project_out
from interplab.sae.config import SAEConfig
from interplab.sae.model import SAE
from interplab.sae.steer import clamp_feature, splice_sae, steer_feature
from tests.tiny import tiny_model

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
TEXTS = ["the cat sat on the mat", "hot weather is a cold dog"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest (and steadiest on a busy 2-core machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plain_and_spread(tmp_path_factory):
    """The tiny llama, and the same weights loaded with a device_map whose block 1 lives on disk."""
    tiny = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny.hf.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    plain = interplab.load(str(folder), device="cpu")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    spread = interplab.load(str(folder), device_map=device_map,
                            offload_folder=str(tmp_path_factory.mktemp("offload")))
    return plain, spread


def test_capture_keeps_activations_where_computed(llama):
    cache = interplab.capture(llama, SITES[0], TEXTS)
    assert cache[SITES[0]].device == llama.device
    offloaded = interplab.capture(llama, SITES[0], TEXTS, device="cpu", dtype=torch.bfloat16)
    assert offloaded[SITES[0]].dtype == torch.bfloat16


def test_load_refuses_device_and_device_map_together():
    with pytest.raises(ValueError, match="either device= .* or device_map="):
        interplab.load("tinystories-656k", device="cpu", device_map="auto")


def test_device_map_model_captures_like_the_plain_model(plain_and_spread):
    plain, spread = plain_and_spread
    assert spread.hf.hf_device_map["model.layers.1"] == "disk"
    assert spread.device == torch.device("cpu")
    a = interplab.capture(plain, SITES, TEXTS, logits=True)
    b = interplab.capture(spread, SITES, TEXTS, logits=True)
    for site in SITES:
        torch.testing.assert_close(b[site], a[site], rtol=0, atol=0)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)


def _edits(plain):
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    source = interplab.capture(plain, SITES[1], ["the dog sat on the mat", "cold weather is a hot cat"])
    sae = SAE(SAEConfig(d_in=32, d_sae=64, family="topk", k=6, site=SITES[1]),
              generator=torch.Generator().manual_seed(0))
    return {"add": add_vector(direction, scale=3.0), "project": project_out(direction),
            "patch": patch(source, positions=[2, 3]), "mean": mean_ablate(source),
            "steer_feature": steer_feature(sae, 5, scale=4.0), "clamp": clamp_feature(sae, [1, 2], 2.0),
            "splice": splice_sae(sae)}


def _same_logits(plain, spread, edit):
    outputs = []
    for model in (plain, spread):
        with intervene(model, {SITES[1]: edit}):
            outputs.append(interplab.capture(model, SITES[2], TEXTS, logits=True).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_device_map_model_steers_and_patches_like_the_plain_model(plain_and_spread):
    plain, spread = plain_and_spread
    edits = _edits(plain)
    for name in ("add", "patch", "clamp"):
        _same_logits(plain, spread, edits[name])


@pytest.mark.slow
def test_device_map_model_every_edit_and_generate_like_the_plain_model(plain_and_spread):
    plain, spread = plain_and_spread
    edits = _edits(plain)
    for edit in edits.values():
        _same_logits(plain, spread, edit)
    texts = []
    for model in (plain, spread):
        with intervene(model, {SITES[1]: edits["add"]}):
            texts.append(interplab.generate(model, "the cat", max_new_tokens=6))
    assert texts[0] == texts[1]


# --- per-device code paths: 'meta' tensors stand in for a second device ------------------------

def _meta_context(llama, act):
    tracker = PositionTracker()
    return HookContext(llama.site(SITES[1]), llama, tracker)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_follow_the_activation_device_and_dtype(llama, dtype):
    act = torch.randn(2, 5, 32).to(device="meta", dtype=dtype)
    ctx = _meta_context(llama, act)
    direction = torch.randn(32)
    source = torch.randn(3, 5, 32)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, family="topk", k=6, site=SITES[1]))
    for edit in (add_vector(direction), project_out(direction), mean_ablate(source), steer_feature(sae, 3, scale=1.0),
                 clamp_feature(sae, 3, 1.0), splice_sae(sae)):
        bound = edit.bind(llama.site(SITES[1]), llama)
        for _ in range(2):
            out = bound(act, ctx)
            assert out.device.type == "meta" and out.dtype == dtype, type(edit).__name__
    assert sae.W_enc.device.type == "cpu"  # the user's SAE is untouched; a copy went to 'meta'


def test_copies_are_made_once_per_device_and_dtype():
    copies, vector = Copies(), torch.randn(8)
    on_meta = copies.like(vector, torch.empty(2, 8, device="meta", dtype=torch.bfloat16))
    again = copies.like(vector, torch.empty(3, 8, device="meta", dtype=torch.bfloat16))
    assert on_meta is again and on_meta.dtype == torch.bfloat16 and len(copies) == 1
    assert copies.like(vector, torch.empty(1, 8)) is vector  # same device and dtype: no copy


# --- bf16 models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_llama():
    model = tiny_model("llama", seed=3)
    import copy

    bf16 = copy.deepcopy(model)
    bf16.hf.to(torch.bfloat16)
    return bf16


def test_bf16_steering_adds_in_the_activation_dtype(bf16_llama):
    direction = torch.randn(32)
    plain = interplab.capture(bf16_llama, SITES[0], TEXTS)[SITES[0]]
    assert plain.dtype == torch.bfloat16
    with intervene(bf16_llama, {SITES[0]: add_vector(direction, scale=2.0)}):
        steered = interplab.capture(bf16_llama, SITES[0], TEXTS)[SITES[0]]
    torch.testing.assert_close(steered, plain + (2.0 * direction).to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_sae_edit_computes_in_float32(bf16_llama):
    sae = SAE(SAEConfig(d_in=32, d_sae=64, family="topk", k=6, site=SITES[0]),
              generator=torch.Generator().manual_seed(1))
    plain = interplab.capture(bf16_llama, SITES[0], TEXTS)[SITES[0]]
    with intervene(bf16_llama, {SITES[0]: splice_sae(sae)}):
        spliced = interplab.capture(bf16_llama, SITES[0], TEXTS)[SITES[0]]
    with torch.no_grad():
        expected = sae.decode(sae.encode(plain.float())).to(torch.bfloat16)  # float32 SAE math
    torch.testing.assert_close(spliced, expected, rtol=0, atol=0)
