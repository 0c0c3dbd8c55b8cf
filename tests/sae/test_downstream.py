"""Downstream evaluation: CE loss recovered and KL with the SAE spliced in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interplab.interventions import intervene
from interplab.sae.config import SAEConfig
from interplab.sae.downstream import evaluate_downstream, forward_loss, resolve_sae_site
from interplab.sae.metrics import evaluate_sae
from interplab.sae.model import SAE
from interplab.sae.store import Harvester
from tests.tiny import tiny_model

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 96, (6, 20), generator=g)
    ids[:, 0] = 1  # BOS
    ids[2, 9] = 1  # a document boundary inside a window
    return ids


def exact_sae(d: int) -> SAE:
    """A ReLU SAE that reconstructs perfectly: f = (relu(x), relu(-x)), x̂ = f @ [I; -I]."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, family="relu", site=SITE, subtract_decoder_bias=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def null_sae(d: int) -> SAE:
    """An SAE whose reconstruction is always zero."""
    sae = exact_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def hand_run(model, windows, replace=None):
    """(mean next-token loss, log-probabilities at the scored positions) computed without interplab:
    a raw torch hook writes replace(x) over the non-BOS tokens of layer 1's output (SITE)."""
    keep = windows != 1

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        new[keep] = replace(hidden[keep])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.hf.model.layers[1].register_forward_hook(hook) if replace is not None else None
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=windows).logits[:, :-1]
    finally:
        if handle is not None:
            handle.remove()
    targets = windows[:, 1:]
    scored = targets != 1  # BOS is the only special token in these windows
    loss = F.cross_entropy(logits[scored], targets[scored])
    return float(loss), logits[scored].log_softmax(-1)


def hand_metrics(model, sae, windows):
    """CE loss recovered and KL(clean || SAE) from their definitions (zero ablation)."""
    clean, log_p = hand_run(model, windows)
    spliced, log_q = hand_run(model, windows, lambda x: sae.decode(sae.encode(x)))
    ablated, log_a = hand_run(model, windows, torch.zeros_like)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    kl_ablated = F.kl_div(log_a, log_p, log_target=True, reduction="batchmean")
    return dict(clean_loss=clean, sae_loss=spliced, ablated_loss=ablated,
                ce_loss_recovered=(ablated - spliced) / (ablated - clean), kl_sae=float(kl), kl_ablated=float(kl_ablated))


def half_sae(d: int) -> SAE:
    """An SAE whose reconstruction is exactly x / 2: a known partial reconstruction."""
    sae = exact_sae(d)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)
    return sae


def test_perfect_sae_recovers_everything(llama, windows):
    result = evaluate_downstream(llama, exact_sae(32), windows, batch_size=4)
    d = result.downstream
    assert d.sae_loss == pytest.approx(d.clean_loss, abs=1e-5)
    assert d.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert d.kl_sae == pytest.approx(0.0, abs=1e-6)
    assert d.kl_ablated > 1e-4 and d.ablated_loss != pytest.approx(d.clean_loss)
    assert result.activation.fvu == pytest.approx(0.0, abs=1e-10)
    assert result.activation.n_tokens == int((windows != 1).sum())  # BOS left out


def test_zero_reconstruction_is_as_bad_as_zero_ablation(llama, windows):
    d = evaluate_downstream(llama, null_sae(32), windows, batch_size=4).downstream
    assert d.sae_loss == pytest.approx(d.ablated_loss, abs=1e-6)
    assert d.ce_loss_recovered == pytest.approx(0.0, abs=1e-5)
    assert d.kl_sae == pytest.approx(d.kl_ablated, abs=1e-6)


def test_clean_loss_is_the_models_own_loss(llama, windows):
    plain = windows.clone()
    plain[2, 9] = 5  # no special token among the targets: every prediction is scored
    d = evaluate_downstream(llama, exact_sae(32), plain, batch_size=4).downstream
    with torch.no_grad():
        reference = float(llama.hf(input_ids=plain, labels=plain).loss)
    assert d.clean_loss == pytest.approx(reference, rel=1e-5)
    assert d.n_predictions == plain.shape[0] * (plain.shape[1] - 1)


def test_mean_ablation_uses_the_mean_of_the_kept_tokens(llama, windows):
    d = evaluate_downstream(llama, null_sae(32), windows, ablation="mean", batch_size=4).downstream
    acts = Harvester(llama, [SITE], drop_special_tokens=True).run(windows, 0).acts[SITE]
    mean = acts.double().mean(0).float()
    keep = windows != 1

    def replace(act, ctx):
        return torch.where(keep[..., None], mean.expand_as(act), act)

    with intervene(llama, {SITE: replace}):
        expected = forward_loss(llama, windows, batch_size=len(windows))
    assert d.ablated_loss == pytest.approx(expected, rel=1e-5)


def test_activation_metrics_match_the_core(llama, windows):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, family="topk", k=4, site=SITE))
    result = evaluate_downstream(llama, sae, windows, batch_size=4)
    acts = Harvester(llama, [SITE]).run(windows, 0).acts[SITE]
    core = evaluate_sae(sae, [acts])
    assert result.activation.fvu == pytest.approx(core.fvu, rel=1e-5)
    assert result.activation.l0 == pytest.approx(core.l0)
    expected = hand_metrics(llama, sae, windows)
    for name, value in expected.items():
        assert getattr(result.downstream, name) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    names = [row[0] for row in result.rows()]
    assert "CE loss recovered" in names and "KL with SAE" in names and "FVU" in names


@pytest.mark.parametrize("make_sae", [exact_sae, null_sae, half_sae])
def test_downstream_metrics_equal_a_hand_computation(llama, windows, make_sae):
    d = evaluate_downstream(llama, make_sae(32), windows, batch_size=4).downstream
    expected = hand_metrics(llama, make_sae(32), windows)
    for name, value in expected.items():
        assert getattr(d, name) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert d.n_predictions == int((windows[:, 1:] != 1).sum())


def test_half_reconstruction_is_a_partial_case(llama, windows):
    """x̂ = x / 2 is neither endpoint: its KL lies strictly between the perfect SAE's 0 and zero
    ablation's, and its loss differs from both (on a random model it can even beat the clean loss)."""
    d = evaluate_downstream(llama, half_sae(32), windows, batch_size=4).downstream
    assert 1e-5 < d.kl_sae < d.kl_ablated
    assert abs(d.ce_loss_recovered - 1) > 0.05 and abs(d.ce_loss_recovered) > 0.05


def test_sae_width_must_match_the_site(llama, windows):
    sae = SAE(SAEConfig(d_in=64, d_sae=128, family="topk", k=4, site=SITE))
    with pytest.raises(ValueError, match=r"d_in=64.*width 32"):
        evaluate_downstream(llama, sae, windows)
    with pytest.raises(ValueError, match="does not say which site"):
        resolve_sae_site(llama, SAE(SAEConfig(d_in=32, d_sae=64, family="topk", k=4)))
    with pytest.raises(ValueError, match="allows"):
        evaluate_downstream(llama, exact_sae(32), torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="ablation"):
        evaluate_downstream(llama, exact_sae(32), windows, ablation="resample")
