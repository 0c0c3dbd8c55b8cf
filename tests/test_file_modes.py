"""Every kind of artifact interplab writes respects the umask (issue #13: 0600 from mkstemp before)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from tests.tiny import tiny_model


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root) -> dict[str, int]:
    """Mode of `root` and of everything under it."""
    found = {".": stat.S_IMODE(root.stat().st_mode)} if root.is_dir() else {}
    found.update({str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
                 if root.is_dir() else {root.name: stat.S_IMODE(root.stat().st_mode)})
    return found


def assert_shareable(path) -> None:
    for name, mode in modes(path).items():
        wanted = 0o755 if (path / name if path.is_dir() else path).is_dir() else 0o644
        assert mode == wanted, f"{path}/{name} has mode {oct(mode)}, expected {oct(wanted)}"


def test_every_artifact_kind_gets_umask_modes(tmp_path, umask022):
    from interplab.analysis.report import Grid, write_json
    from interplab.sae import SAE, SAEConfig, save_sae, save_saelens
    from interplab.sae.card import write_feature_card
    from interplab.sae.features import build_feature_index
    from interplab.sae.store import StoreConfig, harvest_to_disk
    from interplab.steering.vector import SteeringVector
    from interplab.toy.grokking import GrokkingConfig, save_run, train_grokking

    model = tiny_model("llama")
    site = "blocks.1.hook_resid_post"
    vector = SteeringVector({1: torch.ones(model.d_model)}, model_type="llama")
    written = [vector.save(tmp_path / "vector")]
    pytest.importorskip("gguf")
    written.append(vector.to_gguf(tmp_path / "vector.gguf"))
    sae = SAE(SAEConfig(d_in=model.d_model, d_sae=16, family="topk", k=2, site=site))
    written += [save_sae(sae, tmp_path / "sae"), save_saelens(sae, tmp_path / "saelens")]
    windows = torch.randint(4, 96, (6, 8), generator=torch.Generator().manual_seed(0))
    index = build_feature_index(model, sae, windows, tmp_path / "features.db", n_top=2, n_bins=4)
    index.close()
    written += [tmp_path / "features.db", write_feature_card(tmp_path / "features.db", 0, tmp_path / "card.html")]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 40)
    written.append(harvest_to_disk(model, corpus, tmp_path / "harvest", StoreConfig(sites=(site,), context_length=8,
                                                                                     model_batch_size=2),
                                   contexts_per_shard=2, n_tokens=20))
    run = train_grokking(GrokkingConfig(p=7, d_model=8, n_heads=2, d_mlp=8, steps=2, eval_every=1, checkpoint_every=1))
    save_run(run, tmp_path / "toy")
    written.append(tmp_path / "toy")
    write_json(tmp_path / "analysis" / "ablate.json", {"x": 1.0})
    Grid(torch.zeros(2, 2), ["a", "b"], ["c", "d"]).save(tmp_path / "analysis", "grid")
    written.append(tmp_path / "analysis")
    for path in written:
        assert_shareable(path)
    assert (tmp_path / "harvest" / "shard_00000.safetensors").is_file()
    assert (tmp_path / "toy" / "checkpoints").is_dir() and (tmp_path / "analysis" / "grid.png").is_file()
