"""torch.distributed: 2-process gloo jobs launched with torchrun against one-process references on
the same global batches (TinyStories-656K), per-rank harvests, kill and resume; and the pieces
(shares, gathers, world-size checks) in one process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interplab.sae.parallel import Group, site_owners
from interplab.sae.store import disk_chunks, harvest_to_disk, read_manifest
from interplab.sae.train import train_sae
from tests.sae import dist_worker

WORKER = Path(dist_worker.__file__)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest (and steadiest on a busy 2-core machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torchrun(job: dict, tmp: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    job_file = tmp / f"job_{len(list(tmp.glob('job_*')))}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), str(job_file)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _global_batches(model, corpus: str, n: int = 12) -> dict[str, list[torch.Tensor]]:
    """The first n global batches of a 2-rank job, per site, in one process: rank 0's rows, then
    rank 1's."""
    streams = [iter(dist_worker.store_for(model, corpus, (rank, 2))) for rank in range(2)]
    steps = [next(zip(*streams)) for _ in range(n)]
    return {s: [torch.cat([c.acts[s] for c in chunks]) for chunks in steps] for s in dist_worker.SITES}


@pytest.fixture(scope="module")
def global_batches(tinystories, corpus):
    return _global_batches(tinystories, corpus)


@pytest.fixture(scope="module")
def reference_sae(global_batches):
    """One process on the global batches: what the 2-rank data-parallel jobs must equal."""
    _, train_cfg, saes = dist_worker.settings()
    return train_sae(saes["sae_0"], global_batches[dist_worker.SITES[0]], train_cfg)


def _assert_same_sae(a, b):
    for name, value in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[name], value, rtol=2e-4, atol=2e-5, msg=name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_dir):
    """A small slice of the shared TinyStories sample (enough for the steps, quick to tokenize)."""
    text = (shared_dir / "data" / "tinystories_sample.txt").read_text()[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory, corpus, tinystories):
    """One torchrun job (2 gloo processes) that trains data parallel, trains two sites on two
    ranks and harvests to disk."""
    tmp = tmp_path_factory.mktemp("dist")
    harvest_corpus = tmp / "harvest.txt"
    harvest_corpus.write_text(Path(corpus).read_text()[:12_000])
    job = {"tasks": ["train", "sites", "harvest"], "out": str(tmp / "out"), "corpus": corpus,
           "harvest_corpus": str(harvest_corpus)}
    done = _torchrun(job, tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / "out", str(harvest_corpus)


@pytest.mark.slow
def test_data_parallel_training_equals_one_process_on_the_global_batches(two_rank_job, reference_sae):
    out, _ = two_rank_job
    from interplab.sae.formats import load_sae

    _assert_same_sae(load_sae(out / "train" / "sae"), reference_sae)
    run = json.loads((out / "train" / "run.json").read_text())
    assert run["world_size"] == 2
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["tokens"] == 12 * 2 * 48  # global tokens: both ranks' batches


@pytest.mark.slow
def test_distributed_sites_equal_training_each_site_alone(two_rank_job, global_batches):
    out, _ = two_rank_job
    from interplab.sae.formats import load_sae

    _, train_cfg, saes = dist_worker.settings()
    owners = site_owners(list(dist_worker.SITES), 2)
    for i, site in enumerate(dist_worker.SITES):
        alone = train_sae(saes[f"sae_{i}"], global_batches[site],
                          dataclasses.replace(train_cfg, seed=train_cfg.seed + i))  # SAE i is seeded seed + i
        trained = load_sae(out / "sites" / f"rank_{owners[site]:03d}" / f"sae_{i}")
        _assert_same_sae(trained, alone)


@pytest.mark.slow
def test_two_rank_harvest_reads_back_as_the_one_rank_rows(two_rank_job, tinystories, tmp_path):
    out, harvest_corpus = two_rank_job
    single = harvest_to_disk(tinystories, harvest_corpus, tmp_path / "one", dist_worker.settings()[0],
                             contexts_per_shard=4)
    manifest = read_manifest(out / "harvest")
    assert manifest["world_size"] == 2 and manifest["complete"]
    assert {s["file"].split("/")[0] for s in manifest["shards"]} == {"rank_000", "rank_001"}

    def rows(path):
        chunks = list(disk_chunks(path))
        table = torch.cat([torch.stack([torch.cat([c.contexts for c in chunks]),
                                        torch.cat([c.positions for c in chunks])], 1).double()]
                          + [torch.cat([c.acts[s] for c in chunks]).double() for s in dist_worker.SITES], 1)
        return table[torch.argsort(table[:, 0] * 1000 + table[:, 1])]  # (context, position) order

    torch.testing.assert_close(rows(out / "harvest"), rows(single), rtol=0, atol=0)


@pytest.mark.slow
def test_killed_rank_stops_the_job_and_a_relaunch_resumes(tmp_path, corpus, global_batches, reference_sae):
    from interplab.sae.formats import load_sae

    job = {"tasks": ["train"], "out": str(tmp_path / "out"), "corpus": corpus, "n_steps": 12,
           "checkpoint_every": 4, "kill_rank": 1, "kill_at": 9}
    killed = _torchrun(job, tmp_path)
    assert killed.returncode != 0
    report = killed.stdout + killed.stderr
    assert "another rank stopped" in report or "Signal 9" in report or "SIGKILL" in report, report[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "train" / "checkpoints").iterdir())
    assert checkpoints[-1] == "step_00000008"  # stream batch 9 (2 read ahead at init) is step 10's
    resumed = _torchrun({**job, "kill_rank": None, "resume": True}, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_sae(load_sae(tmp_path / "out" / "train" / "sae"), reference_sae)
    _, train_cfg, saes = dist_worker.settings(12, 4)
    with pytest.raises(ValueError, match="trained by 2 processes and this job has 1"):
        train_sae(saes["sae_0"], global_batches[dist_worker.SITES[0]], train_cfg,
                  out_dir=tmp_path / "out" / "train", resume=True)


# --- one process: the same code path at world size 1 ------------------------------------------

def test_group_of_one_is_a_no_op():
    group = Group.local()
    x = torch.randn(4, 3)
    assert group.gather_rows(x) is x and group.batch_sizes(4) == [4] and group.gather_objects(1) == [1]
    fired = torch.tensor([True, False])
    assert group.reduce_fired(fired) is fired
    assert [group.owns(i) for i in range(3)] == [True, True, True]


def test_site_owners_round_robin():
    assert site_owners(["a", "b", "c"], 2) == {"a": 0, "b": 1, "c": 0}


def test_window_shares_are_disjoint_and_cover_the_corpus(llama):
    from interplab.sae.store import StoreConfig, harvest_chunks

    texts = [" ".join(f"w{(i * 7 + j) % 80}" for j in range(30)) for i in range(3)]
    cfg = StoreConfig(sites=("blocks.0.hook_resid_post",), context_length=8, batch_size=4, buffer_tokens=8,
                      model_batch_size=2)
    whole = torch.cat([c.contexts for c in harvest_chunks(llama, texts, cfg)])
    shares = [torch.cat([c.contexts for c in harvest_chunks(llama, texts, cfg, share=(r, 2))]) for r in range(2)]
    assert set(shares[0].tolist()).isdisjoint(shares[1].tolist())
    assert sorted(torch.cat(shares).tolist()) == sorted(whole.tolist())
    with pytest.raises(ValueError, match="share must be"):
        list(harvest_chunks(llama, texts, cfg, share=(2, 2)))


@pytest.mark.slow
def test_cli_distribute_sites_at_world_size_one(tinystories, corpus, tmp_path):
    from typer.testing import CliRunner

    from interplab.cli import app
    from interplab.sae.formats import load_sae

    args = ["sae", "train", "--model", tinystories.model_id, "--site", ",".join(dist_worker.SITES), "--corpus", corpus,
            "--out", str(tmp_path / "run"), "--d-sae", "256", "--k", "8", "--steps", "6", "--batch-size", "64",
            "--buffer-tokens", "256", "--distribute-sites", "--precision", "bf16", "--device", "cpu"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for site in dist_worker.SITES:  # one process owns every site
        assert load_sae(tmp_path / "run" / "rank_000" / site).cfg.site == site
    bad = CliRunner().invoke(app, [a.replace("bf16", "fp8").replace(str(tmp_path / "run"), str(tmp_path / "other"))
                                   for a in args])
    assert bad.exit_code == 2 and "precision must be one of" in bad.output
    one_site = CliRunner().invoke(app, [a for a in args if a != "--distribute-sites"])
    assert one_site.exit_code == 2 and "blocks.0.hook_resid_post,blocks.1" in one_site.output


def test_distributed_sites_at_world_size_one_and_a_changed_job_is_refused(tmp_path):
    from interplab.sae import SAEConfig, TrainConfig
    from interplab.sae.parallel import train_distributed_sites

    g = torch.Generator().manual_seed(0)
    batches = [{"a": torch.randn(32, 8, generator=g), "b": torch.randn(32, 12, generator=g)} for _ in range(6)]
    configs = {"sae_a": SAEConfig(d_in=8, d_sae=16, family="topk", k=2, site="a"),
               "sae_b": SAEConfig(d_in=12, d_sae=24, family="topk", k=2, site="b")}
    cfg = TrainConfig(n_steps=6, progress=False, tensorboard=False, checkpoint_every=3)
    trained = train_distributed_sites(configs, iter(batches), cfg, out_dir=tmp_path)
    alone = train_sae(configs["sae_b"], (b["b"] for b in batches),
                      TrainConfig(n_steps=6, progress=False, tensorboard=False, seed=1))
    _assert_same_sae(trained["sae_b"], alone)  # SAE number i is seeded seed + i, whoever owns it
    assert json.loads((tmp_path / "sites.json").read_text()) == {"world_size": 1, "owners": {"a": 0, "b": 0}}
    (tmp_path / "sites.json").write_text(json.dumps({"world_size": 2, "owners": {"a": 0, "b": 1}}))
    with pytest.raises(ValueError, match="trained by 2 processes owning sites"):
        train_distributed_sites(configs, iter(batches), cfg, out_dir=tmp_path, resume=True)
