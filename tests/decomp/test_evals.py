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
    table = bench_sae(tinystories, sae, ks=[1, 2], max_tokens=300, name="random", caa=["sycophancy"], n_pairs=6)
    assert table["site"] == site and table["n_tokens"] > 50
    caa = [t for t in table["sparse_probing"]["tasks"] if t["task"].startswith("caa")]
    assert [(t["task"], t["n_train"] + t["n_test"]) for t in caa] == [("caa sycophancy: answer matches", 12)]
    assert 0.0 <= table["absorption"]["mean_absorption_rate"] <= 1.0
    for task in table["sparse_probing"]["tasks"]:  # balanced: both classes the same size
        assert task["n_train"] + task["n_test"] == 2 * round((task["n_train"] + task["n_test"]) / 2)
    path = write_results(tmp_path / "random.json", table)
    assert read_results(path)["sparse_probing"]["mean_sae_accuracy"].keys() == {"1", "2"}
    plot = plot_comparison([table, dict(table, name="again")], tmp_path / "cmp.png")
    assert plot.stat().st_size > 1000


# --- the CAA behaviour task ------------------------------------------------------------------------

def _always_a_dataset(n=24):
    """A/B questions whose matching answer is always (A): the label is the answer letter itself."""
    from interplab.steering.datasets import ContrastDataset, ContrastPair

    pairs = [ContrastPair("(A)", "(B)", f"Once upon a time there was a {word} number {i}. Is it nice?\n(A) yes\n(B) no")
             for i, word in zip(range(n), ["cat", "dog", "girl", "boy"] * n)]
    return ContrastDataset(tuple(pairs), kind="ab", source="planted")


def test_caa_task_reads_the_answer_letter(tinystories):
    """At blocks.0.hook_resid_pre (the token embedding) the activation is the read token's embedding:
    every matching row is embed('A') and every other embed('B'), so a planted latent that fires on
    embed('A') - embed('B') probes perfectly at k=1; an off-by-one position would read '(' and give
    identical rows (chance)."""
    from interplab.sae.evals.tasks import caa_task

    task = caa_task(tinystories, "blocks.0.hook_resid_pre", _always_a_dataset(), n_pairs=10)
    assert task.acts.shape == (20, 128) and task.labels.tolist() == [1, 0] * 10
    tokenizer = tinystories.require_tokenizer()
    embed = tinystories.hf.get_input_embeddings().weight.detach()
    a, b = (embed[tokenizer(x, add_special_tokens=False)["input_ids"][-1]] for x in ("(A", "(B"))
    torch.testing.assert_close(task.acts[0::2], a.expand(10, -1))
    torch.testing.assert_close(task.acts[1::2], b.expand(10, -1))
    W_enc = torch.zeros(128, 4)
    W_enc[:, 2] = a - b
    cfg = SAEConfig(d_in=128, d_sae=4, family="relu", normalize_input=False, subtract_decoder_bias=False)
    sae = SAE(cfg).eval()
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -float((a - b) @ (a + b)) / 2, 0.0]))
    result = sparse_probing(sae, task, ks=[1])
    assert result.top_latents[0] == 2 and result.sae_accuracy[1] == 1.0 and result.raw_accuracy == 1.0


def test_caa_task_equals_plain_hf_hidden_states(tinystories):
    """Deeper in the model the rows are the HF hidden states at the answer-letter position."""
    from interplab.sae.evals.tasks import caa_task
    from interplab.steering.extract import tokenize_dataset

    dataset = _always_a_dataset(4)
    task = caa_task(tinystories, "blocks.0.hook_resid_post", dataset)
    for row, text in enumerate(tokenize_dataset(tinystories, dataset, read="answer", chat=False)):
        with torch.no_grad():
            out = tinystories.hf(torch.tensor([text.ids]), output_hidden_states=True)
        hidden = out.hidden_states[1][0]  # block 0's output (the last entry of hidden_states is normed)
        torch.testing.assert_close(task.acts[row], hidden[text.span[0]], atol=1e-5, rtol=1e-5)


def test_caa_task_from_the_shared_data_and_bad_input(tinystories):
    from interplab.sae.evals.tasks import caa_task

    task = caa_task(tinystories, "blocks.1.hook_resid_post", "sycophancy", n_pairs=4)
    assert task.name == "caa sycophancy: answer matches" and task.acts.shape == (8, 128)
    with pytest.raises(ValueError, match="no CAA test data for 'nonsense'"):
        caa_task(tinystories, "blocks.1.hook_resid_post", "nonsense")
    with pytest.raises(UserInputError, match="n_pairs must be >= 4"):
        caa_task(tinystories, "blocks.1.hook_resid_post", "sycophancy", n_pairs=2)
