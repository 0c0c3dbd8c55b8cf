"""Training: dictionary recovery, AuxK revival, resume == uninterrupted, logs, several SAEs at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from interplab.sae import SAE, SAEConfig, TrainConfig, evaluate_sae, load_sae, train_sae, train_saes
from interplab.sae.train import lr_factor, sparsity_factor


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest (and steadiest on a busy 2-core machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SparseDictionary:
    """x = Σ_i c_i·d_i: n_features unit directions in d dimensions, each active with probability p
    and magnitude uniform in [0.5, 1.5]."""

    def __init__(self, n_features: int = 64, d: int = 32, p: float = 0.04, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.directions = torch.randn(n_features, d, generator=g)
        self.directions /= self.directions.norm(dim=1, keepdim=True)
        self.p = p

    def batches(self, n_batches: int, batch_size: int = 256, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        n_features = self.directions.shape[0]
        for _ in range(n_batches):
            active = torch.rand(batch_size, n_features, generator=g) < self.p
            magnitude = torch.rand(batch_size, n_features, generator=g) + 0.5
            yield (active * magnitude) @ self.directions

    def recovered(self, sae: SAE, threshold: float = 0.9) -> float:
        """Fraction of true directions whose best-matching decoder row has cosine > threshold."""
        rows = sae.W_dec.detach().double()
        rows = rows / rows.norm(dim=1, keepdim=True)
        best = (self.directions.double() @ rows.T).max(dim=1).values
        return float((best > threshold).double().mean())


def quiet(n_steps: int, **kwargs) -> TrainConfig:
    return TrainConfig(n_steps=n_steps, progress=False, tensorboard=False, **kwargs)


# ---- does training work ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["topk", "batchtopk", "relu", "jumprelu"])
def test_training_recovers_the_true_dictionary(family):
    data = SparseDictionary()
    k = {"k": 4} if family in ("topk", "batchtopk") else {}
    cfg = SAEConfig(d_in=32, d_sae=128, family=family, **k)
    sae = train_sae(cfg, data.batches(1000), quiet(1000, log_every=1000))
    assert data.recovered(sae) >= 0.9
    metrics = evaluate_sae(sae, list(data.batches(4, 1024, seed=99)))
    assert metrics.fvu < 0.5
    assert 1.5 < metrics.l0 < 8  # about p·n_features = 2.56 true features per token


def test_auxk_revives_planted_dead_latents():
    """Half the latents start with b_enc = -20, so TopK never selects them and they get no gradient
    from the reconstruction; only AuxK can bring them back."""
    data = SparseDictionary(n_features=64, d=32, p=0.05)

    def train(auxk_coefficient: float) -> float:
        cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4, auxk_coefficient=auxk_coefficient)
        sae = SAE(cfg, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            sae.b_enc[32:] = -20.0
        stream = list(data.batches(400, 256))
        sae.init_from_data_(torch.cat(stream[:4]), b_dec="mean")
        optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
        since_fired = torch.zeros(64, dtype=torch.int64)
        for x in stream:
            out = sae(x, dead_mask=since_fired >= 1024)
            out.loss.backward()
            sae.project_decoder_grad_()
            optimizer.step()
            optimizer.zero_grad()
            sae.apply_constraints_()
            since_fired += x.shape[0]
            since_fired[out.fired()] = 0
        return evaluate_sae(sae, list(data.batches(8, 1024, seed=7))).dead_fraction

    assert train(0.0) >= 0.5  # without AuxK the planted half stays dead
    assert train(1 / 32) <= 0.15


def test_several_saes_from_one_stream_equal_training_each_alone():
    data = SparseDictionary()
    configs = {
        "small_topk": SAEConfig(d_in=32, d_sae=64, family="topk", k=4),
        "big_relu": SAEConfig(d_in=32, d_sae=128, family="relu"),
    }
    together = train_saes(configs, data.batches(30), quiet(30, log_every=10))
    alone = train_sae(configs["big_relu"], data.batches(30), quiet(30, log_every=10, seed=1))  # SAE #1 uses seed + 1
    for name, tensor in together["big_relu"].state_dict().items():
        assert torch.equal(tensor, alone.state_dict()[name]), name
    assert together["small_topk"].cfg.d_sae == 64


def test_sequence_of_configs_gets_names():
    data = SparseDictionary()
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4)
    saes = train_saes([cfg, cfg], data.batches(3), quiet(3))
    assert list(saes) == ["topk_64", "topk_64_2"]


# ---- resume ----------------------------------------------------------------------------------


class Killed(Exception):
    pass


def killed_after(batches, n: int):
    """Yields n batches, then dies like a killed process would (before training on batch n+1)."""
    for i, x in enumerate(batches):
        if i == n:
            raise Killed
        yield x


@pytest.mark.parametrize("family", ["topk", "batchtopk", "jumprelu"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, family):
    data = SparseDictionary()
    k = {"k": 4} if family in ("topk", "batchtopk") else {}
    configs = {"a": SAEConfig(d_in=32, d_sae=512, family=family, **k), "b": SAEConfig(d_in=32, d_sae=96, family="relu")}
    # a wide SAE and a small dead_after_tokens, so that dead latents (and AuxK) matter across the kill
    cfg = quiet(40, log_every=5, checkpoint_every=10, dead_after_tokens=512, eval_every=20)
    eval_batches = list(data.batches(2, 128, seed=5))

    full = train_saes(configs, data.batches(40), cfg, out_dir=tmp_path / "full", eval_batches=eval_batches)

    with pytest.raises(Killed):
        train_saes(configs, killed_after(data.batches(40), 23), cfg, out_dir=tmp_path / "resumed",
                   eval_batches=eval_batches)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]
    resumed = train_saes(configs, data.batches(40), cfg, out_dir=tmp_path / "resumed", eval_batches=eval_batches,
                         resume=True)

    for name in configs:
        for key, tensor in full[name].state_dict().items():
            assert torch.equal(tensor, resumed[name].state_dict()[key]), f"{name}.{key}"
    full_log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    strip = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]  # noqa: E731
    assert strip(resumed_log) == strip(full_log)  # lines logged after step 20 before the kill are dropped
    if family != "jumprelu":
        assert any(r["sae"] == "a" and r["step"] > 20 and r.get("auxk", 0) > 0 for r in full_log)


def test_resume_refuses_a_changed_setup(tmp_path):
    data = SparseDictionary()
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4)
    train_sae(cfg, data.batches(10), quiet(10, checkpoint_every=5), out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"TrainConfig fields \['n_steps'\] differ"):
        train_sae(cfg, data.batches(20), quiet(20, checkpoint_every=5), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="SAE configs differ"):
        train_sae(SAEConfig(d_in=32, d_sae=64, family="topk", k=5), data.batches(10),
                  quiet(10, checkpoint_every=5), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="pass resume=True"):
        train_sae(cfg, data.batches(10), quiet(10, checkpoint_every=5), out_dir=tmp_path)
    with pytest.raises(ValueError, match="has only 3 batches"):
        train_sae(cfg, data.batches(3), quiet(10, checkpoint_every=5), out_dir=tmp_path, resume=True)


# ---- files written -----------------------------------------------------------------------------


def test_out_dir_holds_log_checkpoints_and_final_saes(tmp_path):
    data = SparseDictionary()
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4, site="blocks.1.hook_resid_post")
    sae = train_sae(cfg, data.batches(12), quiet(12, log_every=4, checkpoint_every=3, keep_checkpoints=2),
                    out_dir=tmp_path, eval_batches=list(data.batches(1, 64, seed=3)))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [4, 8, 12]
    assert {"loss", "mse", "fvu", "l0", "lr", "dead_fraction", "tokens", "tokens_per_s"} <= set(train_records[0])
    assert train_records[-1]["tokens"] == 12 * 256
    assert train_records[-1]["lr"] == pytest.approx(sae_lr := 2e-4 / (64 / 2**14) ** 0.5 * lr_factor(11, quiet(12)))
    assert sae_lr > 0
    eval_records = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in eval_records] == [12] and "explained_variance" in eval_records[0]
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000009", "step_00000012"]  # older ones pruned, no temp folders left
    assert {p.name for p in (tmp_path / "checkpoints" / "step_00000012").iterdir()} == {"sae", "trainer_state.pt"}
    final = load_sae(tmp_path / "sae")
    assert final.cfg == cfg
    for key, tensor in sae.state_dict().items():
        assert torch.equal(final.state_dict()[key], tensor)


def test_tensorboard_scalars_equal_the_jsonl_log(tmp_path):
    # tensorboard is in the test extra: this runs against the real reader, never skipped
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = SparseDictionary()
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4)
    train_sae(cfg, data.batches(4), TrainConfig(n_steps=4, log_every=2, tensorboard=True), out_dir=tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for key in ("loss", "mse"):
        tag = f"{train[0]['sae']}/train/{key}"
        assert tag in events.Tags()["scalars"]
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx({r["step"]: r[key] for r in train}, rel=1e-6)


def test_library_defaults_are_quiet(tmp_path, capsys):
    assert TrainConfig(n_steps=1).progress is False and TrainConfig(n_steps=1).tensorboard is False
    data = SparseDictionary()
    train_sae(SAEConfig(d_in=32, d_sae=64, family="topk", k=4), data.batches(2), TrainConfig(n_steps=2),
              out_dir=tmp_path)
    assert not (tmp_path / "tensorboard").exists()
    assert capsys.readouterr().err == ""


def test_torn_log_line_does_not_block_resume(tmp_path):
    data = SparseDictionary()
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4)
    train_cfg = quiet(10, log_every=2, checkpoint_every=5)
    with pytest.raises(Killed):
        train_sae(cfg, killed_after(data.batches(10), 7), train_cfg, out_dir=tmp_path)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # killed in the middle of an append
    train_sae(cfg, data.batches(10), train_cfg, out_dir=tmp_path, resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]


def test_checkpoint_is_whole_or_absent(tmp_path, monkeypatch):
    import interplab.sae.train as train_module

    data = SparseDictionary()
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4)
    real_save, calls = torch.save, []

    def dying_save(obj, path, *args, **kwargs):  # the trainer state is the checkpoint's last file
        calls.append(path)
        if len(calls) == 2:
            raise Killed
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", dying_save)
    with pytest.raises(Killed):
        train_sae(cfg, data.batches(10), quiet(10, checkpoint_every=5), out_dir=tmp_path)
    monkeypatch.setattr(train_module.torch, "save", real_save)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000005"]
    # a checkpoint whose SAE comes from another step is refused on resume
    train_sae(cfg, data.batches(10), quiet(10, checkpoint_every=5, keep_checkpoints=3), out_dir=tmp_path / "b")
    step5, step10 = (tmp_path / "b" / "checkpoints" / n for n in ("step_00000005", "step_00000010"))
    shutil.rmtree(step10 / "sae")
    shutil.copytree(step5 / "sae", step10 / "sae")
    with pytest.raises(ValueError, match=r"step_00000010/sae does not belong to .*trainer_state.pt"):
        train_sae(cfg, data.batches(10), quiet(10, checkpoint_every=5, keep_checkpoints=3), out_dir=tmp_path / "b",
                  resume=True)


# ---- schedules ---------------------------------------------------------------------------------


def test_schedules():
    cfg = quiet(100, lr_warmup_fraction=0.1, lr_decay_fraction=0.2, sparsity_warmup_fraction=0.5)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == 1.0 and lr_factor(50, cfg) == 1.0
    assert lr_factor(80, cfg) == pytest.approx(1.0) and lr_factor(99, cfg) == pytest.approx(0.05)
    assert sparsity_factor(0, cfg) == pytest.approx(0.02) and sparsity_factor(49, cfg) == 1.0


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_training_input_fails_before_training():
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4)
    with pytest.raises(ValueError, match=r"batch 0 has shape \(8, 16\); the SAEs need \(batch, 32\)"):
        train_sae(cfg, [torch.randn(8, 16)], quiet(5))
    with pytest.raises(TypeError, match="float tensor"):
        train_sae(cfg, [torch.ones(8, 32, dtype=torch.int64)], quiet(5))
    with pytest.raises(ValueError, match="yielded no batch"):
        train_sae(cfg, [], quiet(5))
    with pytest.raises(ValueError, match="share d_in"):
        train_saes([cfg, SAEConfig(d_in=16, d_sae=64, family="relu")], [torch.randn(8, 32)], quiet(5))
    with pytest.raises(ValueError, match="resume=True needs the out_dir"):
        train_sae(cfg, [torch.randn(8, 32)], quiet(5), resume=True)
    with pytest.raises(ValueError, match="eval batch 0"):
        train_sae(cfg, [torch.randn(8, 32)], quiet(5), eval_batches=[torch.randn(4, 31)])
    with pytest.raises(ValueError, match="SAE name"):
        train_saes({"../x": cfg}, [torch.randn(8, 32)], quiet(5))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(n_steps=0), "n_steps"),
        (dict(n_steps=10, lr=-1.0), "lr must be"),
        (dict(n_steps=10, lr_warmup_fraction=0.9, lr_decay_fraction=0.2), "must not exceed 1"),
        (dict(n_steps=10, b_dec_init="median"), "b_dec_init"),
        (dict(n_steps=10, adam_beta2=1.0), "adam_beta2"),
        (dict(n_steps=10, device="gpu0"), "device 'gpu0'"),
    ],
)
def test_train_config_rejects_wrong_values(kwargs, fragment):
    with pytest.raises(ValueError, match="invalid TrainConfig") as info:
        TrainConfig(**kwargs)
    assert fragment in str(info.value)


def test_short_stream_warns_and_keeps_what_was_trained(tmp_path: Path):
    cfg = SAEConfig(d_in=32, d_sae=64, family="topk", k=4)
    with pytest.warns(UserWarning, match="ended after 3 of 10 steps"):
        sae = train_sae(cfg, list(SparseDictionary().batches(3)), quiet(10), out_dir=tmp_path)
    assert isinstance(sae, SAE) and (tmp_path / "sae" / "sae.safetensors").is_file()
