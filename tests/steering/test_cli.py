"""`interplab vector ...`, `interplab steer` on a tiny model saved to a folder."""

import json

import pytest
from typer.testing import CliRunner

from interplab.cli import app
from tests.steering.test_evaluate import ab_data, ab_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = ab_model()
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ab.json"
    items = [{"question": p.prompt, "answer_matching_behavior": p.positive,
              "answer_not_matching_behavior": p.negative} for p in ab_data()]
    path.write_text(json.dumps(items * 3, indent=1))
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_extract_eval_export_steer(tmp_path, model_dir, ab_file):
    out = tmp_path / "vec"
    code, text = run("vector", "extract", "--pairs", ab_file, "--model", model_dir, "--layers", "0-2",
                     "--holdout", "0.25", "-o", out)
    assert code == 0, text
    assert (out / "config.json").exists() and (out / "report.csv").exists() and (out / "report.png").exists()
    assert "held-out acc" in text
    code, text = run("vector", "eval", out, "--test", ab_file, "--scales", "-1,0,1", "--layers", "1",
                     "--prompt", "is it hot ?", "-n", "3")
    assert code == 0, text
    for name in ("ab_sweep.csv", "ab_sweep.json", "ab_sweep.png", "ab_heatmap.png", "damage.csv", "damage.png",
                 "generations.json"):
        assert (out / "eval" / name).exists(), name
    code, text = run("vector", "export-gguf", out, "-o", tmp_path / "v.gguf")
    assert code == 0, text
    code, text = run("vector", "import-gguf", tmp_path / "v.gguf", "-o", tmp_path / "back")
    assert code == 0 and (tmp_path / "back" / "config.json").exists(), text
    code, text = run("steer", "--vector", out, "--model", model_dir, "--scale", "-2", "--layers", "1",
                     "--compare", "-n", "3", "is it hot ?")
    assert code == 0 and "[baseline]" in text and "[steered x-2]" in text, text


def test_actadd_from_the_command_line(tmp_path, model_dir):
    code, text = run("vector", "extract", "--positive", "hot", "--negative", "cold", "--model", model_dir,
                     "--layers", "1", "-o", tmp_path / "aa")
    assert code == 0, text
    assert json.loads((tmp_path / "aa" / "config.json").read_text())["position_aligned"] is True


@pytest.mark.parametrize("args, message", [
    (["vector", "eval", "VEC", "--test", "AB", "--scales", "1,abc"], "scale 'abc' is not a number"),
    (["vector", "extract", "--pairs", "AB", "--model", "MODEL", "--layers", "7", "-o", "OUT"], "layer 7 is out of range"),
    (["vector", "extract", "--pairs", "BAD", "--model", "MODEL", "-o", "OUT"], "bad.json:1:"),
    (["vector", "extract", "--model", "MODEL", "-o", "OUT"], "give exactly one source"),
    (["steer", "--vector", "VEC", "--scale", "x", "hi"], "Invalid value for '--scale'"),
    (["steer", "--vector", "VEC", "--positions", "bogus", "hi"], "--positions must be one of"),
    (["vector", "extract", "--pairs", "AB", "--model", "MODEL", "-o", "VEC"], "already exists"),
    (["vector", "eval", "VEC", "--test", "AB", "--n-items", "0"], "--n-items must be >= 1"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, model_dir, ab_file, args, message):
    vec = tmp_path / "vec"
    if "VEC" in args:
        code, text = run("vector", "extract", "--pairs", ab_file, "--model", model_dir, "--layers", "1", "-o", vec)
        assert code == 0, text
    (tmp_path / "bad.json").write_text('[{"question": "q" "answer_matching_behavior": "(A)"}]')
    swap = {"VEC": vec, "AB": ab_file, "MODEL": model_dir, "OUT": tmp_path / "out", "BAD": tmp_path / "bad.json"}
    code, text = run(*[swap.get(a, a) for a in args])
    assert code == 2 and message in text, text


def test_demo_saves_the_vector_it_builds(tmp_path, model_dir):
    from interplab.steering import SteeringVector

    out = tmp_path / "cold-minus-hot"
    code, text = run("demo", "-m", model_dir, "--layers", "1", "--scales", "2", "-n", "3", "-o", out)
    assert code == 0, text
    assert "[baseline]" in text and "[steered, scale +2]" in text and f"saved the vector to {out}" in text
    vec = SteeringVector.load(out)
    assert vec.layers == [1] and vec.norms()[1] > 0
    code, text = run("demo", "-m", model_dir, "--layers", "1", "-o", out)
    assert code == 2 and "already exists" in text
