"""The fast training paths against their references: sync-free AuxK and BatchTopK threshold equal
the host-synchronising ones, bf16 autocast training matches float32 quality, and the sparse TopK
path under autocast matches the dense one. (tests/gpu/ repeats these on CUDA.)"""

from __future__ import annotations

import pytest
import torch

from interplab.sae import SAE, SAEConfig, TrainConfig, evaluate_sae, train_sae
from tests.sae.test_train import SparseDictionary


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _topk(seed: int = 0, **overrides) -> SAE:
    sae = SAE(SAEConfig(d_in=20, d_sae=96, family=overrides.pop("family", "topk"), k=5, auxk_k=9, **overrides),
              generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(96, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return sae


def _loss_and_grads(sae: SAE, x: torch.Tensor, dead: torch.Tensor, **kwargs):
    sae.zero_grad()
    out = sae(x, dead_mask=dead, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 40])  # none, fewer than auxk_k, more than auxk_k
def test_sync_free_auxk_equals_the_reference(sparse, n_dead):
    sae = _topk()
    sae.use_sparse_kernels = sparse
    x = torch.randn(33, 20) * 2 + 1
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    ref, ref_grads = _loss_and_grads(sae, x, dead)
    fast, fast_grads = _loss_and_grads(sae, x, dead, host_sync=False)
    assert "auxk" in fast.losses and ("auxk" in ref.losses) == (n_dead > 0)
    torch.testing.assert_close(fast.loss, ref.loss)
    if n_dead == 0:
        assert float(fast.losses["auxk"].detach()) == 0.0
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, msg=name)


def test_batchtopk_threshold_update_without_host_sync():
    sae = SAE(SAEConfig(d_in=12, d_sae=48, family="batchtopk", k=3))
    x = torch.randn(16, 12)
    with torch.no_grad():
        acts = sae(x).feature_acts()
    expected = 0.01 * float(acts[acts > 0].min())  # θ was 0: θ ← 0.99·0 + 0.01·min kept
    torch.testing.assert_close(float(sae.threshold), expected)
    with torch.no_grad():  # nothing kept: θ stays
        before = sae.threshold.clone()
        sae._update_batchtopk_threshold(torch.zeros(4, 48))
    assert torch.equal(sae.threshold, before)


def test_sparse_path_under_bf16_autocast_matches_the_dense_path():
    sae = _topk()
    x = torch.randn(64, 20)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::5] = True
    outs = {}
    for sparse in (True, False):
        sae.use_sparse_kernels = sparse
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[sparse] = _loss_and_grads(sae, x, dead, host_sync=False)
    (fast, fast_grads), (slow, slow_grads) = outs[True], outs[False]
    assert fast.latent_indices is not None and slow.latent_indices is None
    # same latents chosen (from the same bf16 pre-activations); values differ by bf16 rounding only
    torch.testing.assert_close(fast.feature_acts().float(), slow.feature_acts().float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=2e-2, atol=2e-2)
    for name, grad in slow_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.parametrize("family", ["topk"])
def test_bf16_training_reaches_float32_quality(family):
    data = SparseDictionary()
    k = {"k": 4} if family == "topk" else {}
    cfg = SAEConfig(d_in=32, d_sae=128, family=family, **k)
    held_out = list(data.batches(4, seed=99))
    fvu = {}
    for precision in ("float32", "bf16"):
        train_cfg = TrainConfig(n_steps=150, lr=3e-3, progress=False, tensorboard=False, precision=precision)
        sae = train_sae(cfg, data.batches(150), train_cfg)
        fvu[precision] = evaluate_sae(sae, held_out).fvu
        assert sae.W_enc.dtype == torch.float32  # float32 master weights
    assert fvu["float32"] < {"topk": 0.3, "relu": 0.7}[family]  # it learned (relu is slower to)
    assert abs(fvu["bf16"] - fvu["float32"]) < 0.1 * fvu["float32"] + 0.01, fvu


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(n_steps=1, precision="fp8")


def test_scatter_rows_dense_variant_equals_the_sparse_one():
    from interplab.sae.model import _scatter_rows

    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(9)])  # (batch 9, k 6)
    weights, rows = torch.randn(9, 6, generator=g), torch.randn(9, 5, generator=g)
    expected = torch.zeros(40, 5)
    for b in range(9):
        for j in range(6):
            expected[indices[b, j]] += weights[b, j] * rows[b]
    torch.testing.assert_close(_scatter_rows(indices, weights, rows, 40, dense=False), expected)
    torch.testing.assert_close(_scatter_rows(indices, weights, rows, 40, dense=True), expected)
