"""interplab against TransformerLens' TransformerBridge on the real TinyStories-656K (a Llama).

The bridge wraps the same HF model instead of re-implementing it, so the two must agree:
captures, an activation-patching grid and a steered greedy generation. The bridge gets its own
load of the weights: booting it rewires the HF module tree it is given in place.

Tolerances: the bridge computes attention eagerly (to expose hook_pattern), so against
interplab on an eager-attention load every activation is bit-identical (atol 0); against
interplab's default SDPA load they differ by float32 rounding of the reordered attention sums
(measured 1.4e-7 of the largest activation), checked at 1e-6 relative. Patching metrics (a
probability): interplab's batched cells on the eager load equal the bridge's one-forward-per-
cell loop exactly; with prefix reuse or SDPA they agree to 1e-6 (measured 3e-7 to 5e-7), the
float32 rounding of differently shaped matmuls.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
bridge_module = pytest.importorskip("transformer_lens.model_bridge")

import interplab  # noqa: E402
from interplab.analysis import patch_heads, patch_residual  # noqa: E402
from interplab.analysis.tasks import Task  # noqa: E402
from interplab.steering import SteeringVector  # noqa: E402

PROMPT = "Once upon a time there was a little girl named Lily. She liked to play outside with her"
# clean/corrupted pairs that tokenise to the same length; two lengths, so the batch is padded
TASK = Task(clean=["Lily and Tom went to the park. Tom gave the ball to",
                   "Tom and Lily went to the big park. Lily gave the ball to"],
            corrupted=["Lily and Tom went to the park. Lily gave the ball to",
                       "Tom and Lily went to the big park. Tom gave the ball to"],
            correct=["a", "a"], metric="prob", name="names")


@pytest.fixture(scope="module")
def folder(shared_dir):
    path = shared_dir / "models" / "TinyStories-656K"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return str(path)


@pytest.fixture(scope="module")
def eager(folder):
    """interplab on an eager-attention load: the same arithmetic as the bridge."""
    return interplab.load(folder, attn_implementation="eager")


@pytest.fixture(scope="module")
def bridge(folder, eager):
    hf = interplab.load(folder).hf  # a private copy: the bridge rewires the model it is given
    return bridge_module.TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=eager.tokenizer,
                                                             device="cpu")


def _ids(model, text=PROMPT):
    return model.tokenizer(text, return_tensors="pt").input_ids


def _bridge_sites(model):
    kinds = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
             "attn.hook_z", "attn.hook_pattern", "mlp.hook_post")
    return ["hook_embed"] + [f"blocks.{layer}.{kind}" for layer in range(model.n_layers) for kind in kinds]


def test_captures_are_bit_identical_to_the_bridge_hooks(eager, bridge):
    ids = _ids(eager)
    sites = _bridge_sites(eager)
    ours = interplab.capture(eager, sites, ids)
    wanted = set(sites) | {"ln_final.hook_normalized", "ln_final.hook_out"}
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(ids, names_filter=lambda name: name in wanted)
    for site in sites:
        assert ours[site].shape == theirs[site].shape, site
        assert torch.equal(ours[site], theirs[site]), (site, float((ours[site] - theirs[site]).abs().max()))
    # the one name that differs: TL's ln_final.hook_normalized is x / rms before the learned scale;
    # interplab's is the norm's output (the bridge's ln_final.hook_out)
    final = interplab.capture(eager, ["ln_final.hook_normalized"], ids)["ln_final.hook_normalized"]
    assert torch.equal(final, theirs["ln_final.hook_out"])
    assert not torch.allclose(final, theirs["ln_final.hook_normalized"], atol=1e-3)


def test_default_sdpa_captures_match_the_bridge_to_float32_rounding(tinystories, bridge):
    ids = _ids(tinystories)
    sites = [f"blocks.{layer}.hook_resid_post" for layer in range(tinystories.n_layers)]
    ours = interplab.capture(tinystories, sites, ids)
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(ids, names_filter=lambda name: name in sites)
    for site in sites:
        scale = float(theirs[site].abs().max())
        assert float((ours[site] - theirs[site]).abs().max()) <= 1e-6 * scale, site


def _bridge_patch(bridge, enc, name, cells, write):
    """Denoising patching with the bridge's own hooks, one forward per cell: `write(act, source,
    cell)` puts (part of) the clean activation into the corrupted run; the mean metric per cell."""
    ids, mask = enc.run("corrupted")
    clean_ids, clean_mask = enc.run("clean")
    assert torch.equal(mask, clean_mask)  # same lengths, so positions line up one to one
    rows, last = torch.arange(len(enc)), enc.last("corrupted")
    with torch.no_grad():
        _, clean = bridge.run_with_cache(clean_ids, attention_mask=clean_mask, names_filter=[name])
        out = []
        for cell in range(cells):
            def hook(act, hook, cell=cell):
                return write(act.clone(), clean[name], cell)
            logits = bridge.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(name, hook)])
            out.append(float(enc.score(logits[rows, last]).mean()))
    return torch.tensor(out)


def _write_position(act, source, p):  # act (batch, pos, d_model): every prompt's token p
    act[:, p] = source[:, p]
    return act


def _write_head(act, source, head):  # act (batch, pos, n_heads, d_head): one head at every position
    act[:, :, head] = source[:, :, head]
    return act


@pytest.fixture(scope="module")
def bridge_grids(eager, bridge):
    """The bridge's residual (layer x position) and head (layer x head) patching metrics."""
    enc = TASK.encode(eager)
    layers = range(eager.n_layers)
    resid = [_bridge_patch(bridge, enc, f"blocks.{layer}.hook_resid_pre", enc.corrupted_ids.shape[1], _write_position)
             for layer in layers]
    heads = [_bridge_patch(bridge, enc, f"blocks.{layer}.attn.hook_z", eager.n_heads, _write_head) for layer in layers]
    return torch.stack(resid), torch.stack(heads)


# both of interplab's engine paths: every cell from the first token, which with eager attention does
# the bridge's arithmetic exactly (atol 0), and prefix reuse (the default), whose cached keys and
# values change the shapes of the matmuls and so the float32 rounding
@pytest.mark.parametrize(("attn", "reuse_prefix", "atol"), [("eager", False, 0.0), ("eager", True, 1e-6),
                                                            ("sdpa", False, 1e-6)])
def test_patching_grids_equal_the_bridge(attn, reuse_prefix, atol, eager, tinystories, bridge_grids):
    model = eager if attn == "eager" else tinystories
    resid, heads = bridge_grids
    grid = patch_residual(model, TASK, columns=None, reuse_prefix=reuse_prefix)
    head_grid = patch_heads(model, TASK, reuse_prefix=reuse_prefix)
    torch.testing.assert_close(grid.raw, resid, rtol=0, atol=atol)
    torch.testing.assert_close(head_grid.raw, heads, rtol=0, atol=atol)
    # not vacuous: the cells move the metric between its corrupted and clean values
    assert float(grid.values.max() - grid.values.min()) > 0.5
    assert float(heads.max() - heads.min()) > 1e-3


def test_steered_greedy_generation_gives_the_bridge_tokens(eager, bridge):
    ids = _ids(eager, "Once upon a time there was a little")
    layer, scale, new = 0, 3.0, 24
    direction = torch.randn(eager.d_model, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector({layer: direction})

    def ours(steer: bool):
        with torch.no_grad(), vector.apply(eager, scale=scale if steer else 0.0):
            out = eager.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                    do_sample=False, use_cache=True)
        return out[0, ids.shape[1]:].tolist()

    def add(act, hook):
        return act + scale * direction

    # use_past_kv_cache=False: with transformers 5.24 the bridge's attention reads the KV cache from a
    # `past_key_values` keyword that HF now passes as `cache`, so its cached generation is wrong
    with torch.no_grad(), bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", add)]):
        theirs = bridge.generate(ids, max_new_tokens=new, do_sample=False, use_past_kv_cache=False,
                                 return_type="tokens", verbose=False)[0, ids.shape[1]:].tolist()
    steered = ours(True)
    assert steered == theirs
    assert steered != ours(False)  # the vector changes the continuation, so equality means something
    # tokens are a coarse check (a slightly different scale gives the same ones): the steered logits
    # over the whole continuation must agree too
    sequence = torch.cat([ids, torch.tensor([steered])], dim=1)
    with torch.no_grad(), vector.apply(eager, scale=scale):
        our_logits = eager.hf(sequence).logits
    with torch.no_grad():
        their_logits = bridge.run_with_hooks(sequence, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", add)])
    torch.testing.assert_close(our_logits, their_logits)
