"""SAE families: shapes, activation rules, gradients, the sparse TopK path, and the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.sae import SAE, SAEConfig, ce_loss_recovered, evaluate_sae, geometric_median
from interplab.sae.metrics import MetricsAccumulator, fraction_of_variance_unexplained, l0, mse
from interplab.sae.model import jump_relu, step_count

FAMILIES = ["relu", "topk", "batchtopk", "jumprelu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest (and steadiest on a busy 2-core machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_sae(family: str, d_in: int = 12, d_sae: int = 48, seed: int = 0, **overrides) -> SAE:
    k = {"k": 5} if family in ("topk", "batchtopk") else {}
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, family=family, **k, **overrides),
              generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # move away from the symmetric initialisation
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.W_enc.add_(torch.randn(d_in, d_sae, generator=g) * 0.1)
    return sae


# ---- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(family="gated", k=None), "family 'gated' is unknown"),
        (dict(family="topk", k=None), "needs k"),
        (dict(family="topk", k=100), "needs k"),
        (dict(family="relu", k=4), "has no meaning"),
        (dict(family="relu", l1_coefficient=-1.0), "l1_coefficient"),
        (dict(family="jumprelu", jumprelu_bandwidth=0.0), "jumprelu_bandwidth"),
        (dict(family="relu", dtype="int8"), "dtype 'int8'"),
        (dict(family="relu", d_in=0), "d_in must be a positive int"),
        (dict(family="relu", l0_coefficient=math.nan), "l0_coefficient"),
    ],
)
def test_config_rejects_wrong_values(kwargs, fragment):
    base = dict(d_in=8, d_sae=32)
    with pytest.raises(ValueError, match="invalid SAEConfig") as info:
        SAEConfig(**{**base, **kwargs})
    assert fragment in str(info.value)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = SAEConfig(d_in=8, d_sae=32, family="topk", k=3, site="blocks.2.hook_resid_post", model_id="m")
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SAEConfig field"):
        SAEConfig.from_dict({**cfg.to_dict(), "colour": "red"})


# ---- shapes and activation rules ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_shapes(family):
    sae = make_sae(family)
    x = torch.randn(3, 7, 12)
    acts = sae.encode(x)
    assert acts.shape == (3, 7, 48)
    assert sae.decode(acts).shape == (3, 7, 12)
    out = sae(x.reshape(-1, 12), dead_mask=torch.ones(48, dtype=torch.bool))
    assert out.reconstruction.shape == (21, 12)
    assert out.feature_acts().shape == (21, 48)
    expected = {"relu": {"mse", "l1"}, "jumprelu": {"mse", "l0"}}.get(family, {"mse", "auxk"})
    assert set(out.losses) == expected
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("sparse_kernels", [True, False])
def test_topk_keeps_exactly_k_latents(sparse_kernels):
    sae = make_sae("topk")
    sae.use_sparse_kernels = sparse_kernels
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so all k selected ones are active
    x = torch.randn(64, 12)
    assert ((sae.encode(x) != 0).sum(-1) == 5).all()
    assert ((sae(x).feature_acts() != 0).sum(-1) == 5).all()
    assert (sae(x).l0() == 5).all()


def test_topk_values_are_the_largest_pre_activations():
    sae = make_sae("topk")
    x = torch.randn(16, 12)
    pre, acts = sae.pre_activations(x), sae.encode(x)
    kth_largest = pre.topk(5, dim=-1).values[:, -1:]
    assert torch.equal(acts != 0, (pre >= kth_largest) & (pre > 0))
    torch.testing.assert_close(acts[acts != 0], pre[acts != 0])


def test_batchtopk_keeps_k_per_token_on_average_then_uses_its_threshold():
    sae = make_sae("batchtopk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = torch.randn(32, 12)
    out = sae(x)  # training mode: k * batch active in the whole batch
    assert int((out.feature_acts() != 0).sum()) == 5 * 32
    kept_min = out.feature_acts()[out.feature_acts() > 0].min()
    torch.testing.assert_close(sae.threshold, 0.01 * kept_min)  # θ ← 0.99·0 + 0.01·min
    sae.eval()
    pre = sae.pre_activations(x)
    torch.testing.assert_close(sae.encode(x), pre.relu() * (pre > sae.threshold))


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    torch.manual_seed(0)
    pre = torch.randn(40, 6)
    theta = torch.rand(6).requires_grad_()
    weights = torch.randn(40, 6)
    eps = 0.7
    (jump_relu(pre, theta, eps) * weights).sum().backward()
    window = ((pre - theta.detach()).abs() < eps / 2).float()
    expected = (-(theta.detach() / eps) * window * weights).sum(0)
    torch.testing.assert_close(theta.grad, expected)
    assert theta.grad.abs().sum() > 0

    theta.grad = None
    (step_count(pre, theta, eps) * weights[:, 0]).sum().backward()
    expected_l0 = (-(1 / eps) * window * weights[:, :1]).sum(0)
    torch.testing.assert_close(theta.grad, expected_l0)


def test_jumprelu_threshold_receives_gradient_through_the_sae_loss():
    sae = make_sae("jumprelu", jumprelu_threshold_init=0.5, jumprelu_bandwidth=1.0)
    out = sae(torch.randn(64, 12) * 3)
    out.loss.backward()
    assert sae.threshold.grad is not None
    assert (sae.threshold.grad != 0).sum() > 40
    assert set(out.losses) == {"mse", "l0"}


def test_jumprelu_gates_at_the_threshold():
    sae = make_sae("jumprelu", jumprelu_threshold_init=0.3)
    x = torch.randn(50, 12)
    pre, acts = sae.pre_activations(x), sae.encode(x)
    assert torch.equal(acts != 0, pre > 0.3)
    torch.testing.assert_close(acts[acts != 0], pre[acts != 0])


def test_relu_l1_penalty_is_weighted_by_decoder_norms():
    sae = make_sae("relu", l1_coefficient=2.0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 48)[:, None])
    x = torch.randn(10, 12)
    out = sae(x, sparsity_scale=0.5)
    expected = 0.5 * 2.0 * (sae.encode(x) * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.losses["l1"], expected)
    torch.testing.assert_close(out.losses["mse"], (out.reconstruction - x).pow(2).sum(-1).mean())


# ---- the sparse TopK kernels against the dense reference ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_topk_path_matches_the_dense_reference(dtype, with_dead):
    sae = make_sae("topk", d_in=20, d_sae=96, auxk_k=9, dtype=str(dtype).removeprefix("torch."))
    x = torch.randn(33, 20, dtype=dtype) * 2 + 1
    dead = torch.zeros(96, dtype=torch.bool)
    if with_dead:
        dead[::4] = True

    def run(sparse: bool):
        sae.zero_grad()
        sae.use_sparse_kernels = sparse
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in sae.named_parameters()}

    fast, fast_grads = run(True)
    slow, slow_grads = run(False)
    assert fast.latent_indices is not None and slow.latent_indices is None
    assert set(fast.losses) == set(slow.losses) == ({"mse", "auxk"} if with_dead else {"mse"})
    torch.testing.assert_close(fast.reconstruction, slow.reconstruction)
    torch.testing.assert_close(fast.feature_acts(), slow.feature_acts())
    for name in fast.losses:
        torch.testing.assert_close(fast.losses[name], slow.losses[name])
    for name, grad in slow_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, msg=f"gradient of {name}")
    assert torch.equal(fast.fired(), slow.fired())


# ---- normalisation, constraints, initialisation -------------------------------------------


def test_input_scale_is_estimated_and_undone():
    torch.manual_seed(0)
    x = torch.randn(500, 12) * 7 + 3
    sae = make_sae("topk")
    plain = make_sae("topk")
    sae.init_from_data_(x, b_dec="mean")
    s = float(sae.input_scale)
    assert (s * x).norm(dim=1).mean().item() == pytest.approx(math.sqrt(12), rel=1e-5)
    torch.testing.assert_close(sae.b_dec, (s * x).mean(0))
    plain.load_state_dict({**sae.state_dict(), "input_scale": torch.tensor(1.0)})
    torch.testing.assert_close(sae.encode(x), plain.encode(s * x))  # the SAE sees s·x
    torch.testing.assert_close(sae.decode(sae.encode(x)), plain.decode(plain.encode(s * x)) / s)


def test_no_normalisation_keeps_scale_one():
    sae = make_sae("relu", normalize_input=False)
    sae.init_from_data_(torch.randn(100, 12) * 50, b_dec="zeros")
    assert float(sae.input_scale) == 1.0
    assert torch.equal(sae.b_dec, torch.zeros(12))


def test_geometric_median_resists_outliers():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(points), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.2, 0.1]], dtype=torch.float64)
    median = geometric_median(square)
    distances = lambda y: (square - y).norm(dim=1).sum()  # noqa: E731
    for shift in ([1e-3, 0], [0, 1e-3], [-1e-3, 0], [0, -1e-3]):
        assert distances(median) <= distances(median + torch.tensor(shift, dtype=torch.float64))


def test_decoder_constraints():
    sae = make_sae("topk")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.apply_constraints_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    sae.W_dec.grad = torch.randn(48, 12)
    sae.project_decoder_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(48), atol=1e-6, rtol=0)

    relu = make_sae("relu")
    before = relu.W_dec.detach().clone()
    relu.apply_constraints_()
    assert torch.equal(relu.W_dec, before)  # ReLU's decoder norms are free (penalised instead)

    jump = make_sae("jumprelu")
    with torch.no_grad():
        jump.threshold.fill_(-1.0)
    jump.apply_constraints_()
    assert (jump.threshold == 0).all()


# ---- bad input ------------------------------------------------------------------------------


def test_wrong_width_is_refused_with_the_expected_width():
    sae = make_sae("topk")
    with pytest.raises(ValueError, match="width 10 but this SAE reads d_in=12"):
        sae.encode(torch.randn(4, 10))
    with pytest.raises(ValueError, match="d_sae=48"):
        sae.decode(torch.randn(4, 40))
    with pytest.raises(ValueError, match="dead_mask"):
        sae(torch.randn(4, 12), dead_mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.wrong_types
def test_wrong_rank_or_dtype_is_refused():
    sae = make_sae("topk")
    with pytest.raises(ValueError, match=r"\(batch, d_in\) matrix"):
        sae(torch.randn(2, 3, 12))
    with pytest.raises(TypeError, match="floating-point"):
        sae.encode(torch.ones(4, 12, dtype=torch.int64))


# ---- metrics ---------------------------------------------------------------------------------


def test_metric_definitions():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    assert fraction_of_variance_unexplained(x, x) == 0.0
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert fraction_of_variance_unexplained(x, mean) == pytest.approx(1.0)
    x_hat = x + torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    total_variance = float((x - x.mean(0)).pow(2).sum())
    assert fraction_of_variance_unexplained(x, x_hat) == pytest.approx(2.0 / total_variance)
    assert mse(x, x_hat) == pytest.approx(2.0 / 6)
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])) == 1.0


def test_metrics_accumulator_counts_dead_and_dense_latents():
    acc = MetricsAccumulator(d_in=2, d_sae=4, dense_threshold=0.5)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    acts = torch.tensor([[1.0, 0, 0, 0], [1.0, 2.0, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    acc.update(x[:2], x[:2], acts[:2])
    acc.update(x[2:], x[2:], acts[2:])
    metrics = acc.result()
    assert metrics.n_tokens == 4
    assert metrics.l0 == pytest.approx(1.0)
    assert metrics.dead_fraction == pytest.approx(0.5)  # latents 2 and 3 never fire
    assert metrics.dense_fraction == pytest.approx(0.25)  # latent 0 fires on 3/4 > 0.5
    assert metrics.fvu == 0.0 and metrics.explained_variance == 1.0


def test_evaluate_sae_streams_like_one_batch():
    sae = make_sae("topk")
    x = torch.randn(90, 12)
    whole = evaluate_sae(sae, [x])
    parts = evaluate_sae(sae, [x[:30], x[30:70], x[70:]])
    for name in ("mse", "fvu", "l0", "dead_fraction", "dense_fraction"):
        assert getattr(parts, name) == pytest.approx(getattr(whole, name), rel=1e-9)
    x_hat = sae.decode(sae.encode(x)).detach()
    assert whole.fvu == pytest.approx(fraction_of_variance_unexplained(x, x_hat), rel=1e-6)
    assert whole.explained_variance == pytest.approx(1 - whole.fvu)
    assert whole.l0 == pytest.approx(5.0, abs=0.5)


def test_ce_loss_recovered():
    assert ce_loss_recovered(clean_loss=2.0, sae_loss=2.5, zero_ablation_loss=7.0) == pytest.approx(0.9)
    assert ce_loss_recovered(clean_loss=2.0, sae_loss=2.0, zero_ablation_loss=7.0) == 1.0
    with pytest.raises(ValueError, match="undefined"):
        ce_loss_recovered(clean_loss=2.0, sae_loss=2.5, zero_ablation_loss=2.0)
