"""Absorption and k-sparse probing on planted cases with known answers."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import UserInputError
from interplab.sae.config import SAEConfig
from interplab.sae.evals.absorption import feature_absorption
from interplab.sae.evals.probing import ProbingTask, sparse_probing, split_indices
from interplab.sae.model import SAE

D = 16
LETTERS = "sabcd"
PLANTED_RATE = 0.3


def _relu_sae(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor) -> SAE:
    cfg = SAEConfig(d_in=D, d_sae=W_enc.shape[1], family="relu", normalize_input=False,
                    subtract_decoder_bias=False)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.zero_()
    return sae.eval()


def _letter_data(n_per_letter=200, seed=0):
    """Tokens of 5 letters; letter i lives along e_{i+2} except 's' along e_0; a planted 30% of the
    s-tokens (the "short"-like tokens) also carry e_1."""
    g = torch.Generator().manual_seed(seed)
    rows, letters, short = [], [], []
    for i, letter in enumerate(LETTERS):
        base = torch.zeros(D)
        base[0 if letter == "s" else i + 1] = 1.0
        for j in range(n_per_letter):
            x = base + 0.05 * torch.randn(D, generator=g)
            is_short = letter == "s" and j < PLANTED_RATE * n_per_letter
            if is_short:
                x[1] += 1.0
            rows.append(x)
            letters.append(letter)
            short.append(is_short)
    return torch.stack(rows), letters, torch.tensor(short)


def _planted_in_test_split(letters, short) -> torch.Tensor:
    """Whether each s-token of the absorption test split is a planted one."""
    labels = torch.tensor([x == "s" for x in letters]).long()
    _, test = split_indices(labels, 0.3, 0)
    return short[test[labels[test].bool()]]


def _letter_sae(absorbing: bool) -> SAE:
    """Latent 0: 's' (silent when e_1 is present if absorbing); latent 1: 'short' (decoder
    (e_0 + e_1)/√2 if absorbing, e_1 if clean); latents 2..5: the other letters."""
    eye = torch.eye(D)
    W_enc, W_dec = torch.zeros(D, 6), torch.zeros(6, D)
    W_enc[:, 0] = eye[0] - (2.0 * eye[1] if absorbing else 0)
    W_dec[0] = eye[0]
    W_enc[:, 1] = eye[1]
    W_dec[1] = (eye[0] + eye[1]) / 2 ** 0.5 if absorbing else eye[1]
    for i in range(2, 6):
        W_enc[:, i] = eye[i]
        W_dec[i] = eye[i]
    return _relu_sae(W_enc, torch.full((6,), -0.5), W_dec)


def test_planted_absorption_is_measured_at_the_planted_rate():
    acts, letters, short = _letter_data()
    result = feature_absorption(_letter_sae(absorbing=True), acts, letters, min_examples=20)
    s = next(r for r in result.letters if r.letter == "s")
    assert s.main_latent == 0
    planted = _planted_in_test_split(letters, short)  # the planted share of the evaluated s-tokens
    assert s.probe_true_positives == planted.numel()
    assert s.absorbed == int(planted.sum())
    assert s.absorption_rate == pytest.approx(float(planted.float().mean()))
    assert s.absorption_rate == pytest.approx(PLANTED_RATE, abs=0.1)
    assert s.absorbing_latents.keys() == {1}
    assert s.false_negatives == s.absorbed
    others = [r for r in result.letters if r.letter != "s"]
    assert all(r.absorbed == 0 for r in others)


def test_clean_pair_is_not_absorbed():
    acts, letters, _ = _letter_data()
    result = feature_absorption(_letter_sae(absorbing=False), acts, letters, min_examples=20)
    assert result.mean_absorption_rate == 0.0
    assert result.mean_false_negative_rate == 0.0


def test_silent_main_latent_without_aligned_absorber_is_not_absorption():
    """The s-latent goes silent on the short tokens, but the latent that fires there points against
    the probe: a false negative, not absorption."""
    acts, letters, short = _letter_data()
    sae = _letter_sae(absorbing=True)
    with torch.no_grad():
        sae.W_dec[1] = -torch.eye(D)[0]  # anti-aligned with the 's' probe (mostly e_0)
    s = next(r for r in feature_absorption(sae, acts, letters).letters if r.letter == "s")
    assert s.false_negative_rate == pytest.approx(float(_planted_in_test_split(letters, short).float().mean()))
    assert s.absorbed == 0


def test_planted_latent_equal_to_the_label_probes_perfectly_at_k1():
    g = torch.Generator().manual_seed(1)
    n = 400
    labels = (torch.rand(n, generator=g) < 0.5).long()
    acts = torch.randn(n, D, generator=g)
    acts[:, 3] = labels.float()  # the label lives on e_3 (plus nothing else)
    W_enc = torch.randn(D, 12, generator=g) * 0.3
    W_enc[3] = 0.0
    W_enc[:, 7] = torch.eye(D)[3]  # latent 7 = the label exactly
    sae = _relu_sae(W_enc, torch.zeros(12), torch.randn(12, D, generator=g))
    assert torch.equal(sae.encode(acts)[:, 7], labels.float())
    result = sparse_probing(sae, ProbingTask("planted", acts, labels), ks=[1, 2, 5])
    assert result.top_latents[0] == 7
    assert result.sae_accuracy[1] == 1.0
    assert result.raw_accuracy >= 0.95


def test_probing_on_noise_is_chance():
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(400, D, generator=g)
    labels = (torch.rand(400, generator=g) < 0.5).long()
    sae = _relu_sae(torch.randn(D, 12, generator=g), torch.zeros(12), torch.randn(12, D, generator=g))
    result = sparse_probing(sae, ProbingTask("noise", acts, labels), ks=[1])
    assert 0.3 < result.sae_accuracy[1] < 0.7


def test_bad_inputs_are_refused():
    sae = _letter_sae(absorbing=False)
    with pytest.raises(UserInputError, match="d_in=16"):
        sparse_probing(sae, ProbingTask("x", torch.zeros(10, 5), torch.zeros(10)))
    with pytest.raises(UserInputError, match="at least 4"):
        sparse_probing(sae, ProbingTask("x", torch.zeros(10, D), torch.zeros(10)))
    with pytest.raises(UserInputError, match="ks"):
        sparse_probing(sae, ProbingTask("x", torch.randn(10, D), torch.arange(10) % 2), ks=[0])
    with pytest.raises(UserInputError, match="no letter"):
        feature_absorption(sae, torch.randn(10, D), list("ssssssssss"))


def test_tokenizer_tasks_bench_and_plot(tinystories, tmp_path):
    from interplab.sae.evals.table import bench_sae, plot_comparison, read_results, write_results

    site = "blocks.0.hook_resid_post"
    sae = SAE(SAEConfig(d_in=128, d_sae=256, family="topk", k=8, site=site), generator=torch.Generator().manual_seed(0))
    table = bench_sae(tinystories, sae, ks=[1, 2], max_tokens=300, name="random")
    assert table["site"] == site and table["n_tokens"] > 50
    assert 0.0 <= table["absorption"]["mean_absorption_rate"] <= 1.0
    for task in table["sparse_probing"]["tasks"]:  # balanced: both classes the same size
        assert task["n_train"] + task["n_test"] == 2 * round((task["n_train"] + task["n_test"]) / 2)
    path = write_results(tmp_path / "random.json", table)
    assert read_results(path)["sparse_probing"]["mean_sae_accuracy"].keys() == {"1", "2"}
    plot = plot_comparison([table, dict(table, name="again")], tmp_path / "cmp.png")
    assert plot.stat().st_size > 1000
