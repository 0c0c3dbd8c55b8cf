import json

import pytest
from typer.testing import CliRunner

from interplab.cli import app
from tests.analysis.tiny_tasks import tiny_task

runner = CliRunner()


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    task = tiny_task(n=3)
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": c, "answer": a, "incorrect": i, "corrupted": k})
                              for c, a, i, k in zip(task.clean, task.correct, task.incorrect, task.corrupted)))
    return str(path)


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_patch_attribute_ablate_lens_embed_math(model_dir, facts, tmp_path):
    out = _ok(["patch", "-m", model_dir, "-t", facts, "--positions", "each", "-o", str(tmp_path / "p")])
    assert "clean" in out and (tmp_path / "p" / "patch_resid.png").exists()
    rows = (tmp_path / "p" / "patch_resid.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].count(",") == 6
    _ok(["patch", "-m", model_dir, "-t", facts, "--grid", "heads", "-o", str(tmp_path / "h")])
    assert json.loads((tmp_path / "h" / "patch_heads.json").read_text())["cols"] == ["H0", "H1", "H2", "H3"]
    out = _ok(["attribute", "-m", model_dir, "-t", facts, "--grid", "layers", "--compare", "-o", str(tmp_path / "a")])
    assert "pearson r" in out
    stats = json.loads((tmp_path / "a" / "compare_layers.json").read_text())
    assert -1 <= stats["pearson"] <= 1 and stats["n_cells"] == 6
    assert (tmp_path / "a" / "compare_layers.png").exists()
    out = _ok(["ablate", "-m", model_dir, "-t", facts, "--method", "zero", "-o", str(tmp_path / "s")])
    assert "baseline logit_diff" in out and (tmp_path / "s" / "ablate_zero.csv").exists()
    out = _ok(["ablate", "-m", model_dir, "-t", facts, "--components", "L0H1,L2.mlp", "--method", "zero",
               "-o", str(tmp_path / "c")])
    assert "with L0H1, L2.mlp zero-ablated" in out
    out = _ok(["lens", "-m", model_dir, "-t", facts, "-o", str(tmp_path / "l")])
    assert "direct logit attribution" in out and (tmp_path / "l" / "dla.csv").exists()
    assert (tmp_path / "l" / "lens.png").exists()
    _ok(["lens", "-m", model_dir, "-p", "w4 w5 w6", "--answer", "w7", "-o", str(tmp_path / "l2")])
    out = _ok(["embed-math", "w1 - w2 + w3", "-m", model_dir, "--top-k", "3", "-o", str(tmp_path / "e")])
    assert len(json.loads((tmp_path / "e" / "embed_math.json").read_text())["nearest"]) == 3


@pytest.mark.parametrize("args, match", [
    (["ablate", "--components", "L0H9"], "head index 9"),
    (["patch", "--grid", "diagonal"], "--grid must be"),
    (["patch", "--layers", "0-9"], "layer 3 is out of range"),
    (["embed-math", "'w1 w2' + w3"], "is 2 tokens"),
    (["lens"], "give --prompt"),
    (["lens", "--task", "ioi", "--prompt", "x"], "not both"),
    (["patch", "--kind", "hook_resid_max"], "--kind must be one of"),
    (["ablate", "--method", "half"], "--method must be one of"),
])
def test_bad_input_exits_2_with_a_message(model_dir, facts, args, match):
    args = args[:1] + ["-m", model_dir] + (["-t", facts] if args[0] in ("ablate", "patch") else []) + args[1:]
    if args[0] == "embed-math":
        args = ["embed-math", args[-1], "-m", model_dir]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and match in result.output, result.output
