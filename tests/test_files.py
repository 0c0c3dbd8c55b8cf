"""The shared file layer: atomic files and folders, umask-respecting modes, clear read errors."""

import json
import os
import stat

import pytest
import torch

from interplab import files
from interplab.errors import ArtifactError, UserInputError


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_json_is_atomic_and_respects_umask(tmp_path, umask022):
    path = files.write_json(tmp_path / "a" / "config.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_failed_write_leaves_target_and_no_temporary(tmp_path):
    target = files.write_text(tmp_path / "t.txt", "old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_nan_is_refused_in_json(tmp_path):
    with pytest.raises(ValueError):
        files.write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_atomic_folder_swaps_whole_or_not_at_all(tmp_path, umask022):
    out = tmp_path / "art"
    with files.atomic_folder(out) as tmp:
        files.write_json(tmp / "config.json", {"k": 1})
        files.save_tensors(tmp / "w.safetensors", {"w": torch.ones(2)})
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    with pytest.raises(RuntimeError):
        with files.atomic_folder(out) as tmp:
            files.write_json(tmp / "config.json", {"k": 2})
            raise RuntimeError("killed between the two files")
    assert files.read_json(out / "config.json") == {"k": 1}          # old config, old tensors
    assert torch.equal(files.load_tensors(out / "w.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]      # no temporaries left
    with files.atomic_folder(out) as tmp:
        files.write_json(tmp / "config.json", {"k": 3})
    assert files.read_json(out / "config.json") == {"k": 3}
    assert not (out / "w.safetensors").exists()                       # replaced whole


def test_atomic_folder_refuses_a_file_target(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        with files.atomic_folder(tmp_path / "f"):
            pass


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ArtifactError, match="latin1.txt is not UTF-8"):
        files.read_text(bad)
    broken = tmp_path / "c.json"
    broken.write_text("{oops")
    with pytest.raises(ArtifactError, match="c.json is not valid JSON"):
        files.read_json(broken)
    with pytest.raises(ArtifactError, match="no such"):
        files.read_json(tmp_path / "missing.json")
    assert issubclass(ArtifactError, UserInputError) and issubclass(UserInputError, ValueError)


def test_truncated_safetensors_is_an_artifact_error(tmp_path):
    path = files.save_tensors(tmp_path / "w.safetensors", {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="w.safetensors is not a readable safetensors"):
        files.load_tensors(path)


def test_jsonl_ignores_only_a_torn_tail(tmp_path):
    log = tmp_path / "log.jsonl"
    files.append_jsonl(log, {"step": 1})
    files.append_jsonl(log, {"step": 2})
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')                     # killed mid-append
    assert files.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{bad\n{"step": 3}\n')
    with pytest.raises(ArtifactError, match="line 2"):
        files.read_jsonl(log)
    assert files.read_jsonl(tmp_path / "none.jsonl") == []


def test_progress_off_returns_the_items_unchanged():
    from interplab.progress import progress, progress_bar

    items = [1, 2, 3]
    assert progress(items, False) is items
    with progress_bar(False, total=3) as bar:
        bar.update(1)
    assert list(progress(items, True, desc="x")) == items
