import json

import pytest
import torch

from interplab.analysis.tasks import IOI_TEMPLATES, Task, ioi_task, load_facts, score
from tests.analysis.tiny_tasks import tiny_task


def test_ioi_prompts_orders_marks_and_corruption():
    task = ioi_task(8, seed=3)
    assert len(task) == 8 and task.metric == "logit_diff" and task.name == "ioi"
    for i, (clean, corrupted) in enumerate(zip(task.clean, task.corrupted)):
        io, s = task.correct[i].strip(), task.incorrect[i].strip()
        assert io != s and clean.endswith(" to") and clean.count(s) == 2 and clean.count(io) == 1
        marks = {k: task.marks[k][i] for k in ("IO", "S1", "S2")}
        assert clean[marks["IO"]:].startswith(io) and clean[marks["S1"]:].startswith(s)
        assert clean[marks["S2"]:].startswith(s) and marks["S1"] < marks["S2"]
        assert (marks["IO"] < marks["S1"]) == (i % 2 == 0)  # ABBA, BABA alternate
        # s2 corruption: only the second mention of S changes, to the IO name
        assert corrupted == clean[:marks["S2"]] + io + clean[marks["S2"] + len(s):]
    assert ioi_task(8, seed=3) == task and ioi_task(8, seed=4) != task


def test_ioi_options():
    one = ioi_task(4, templates=[IOI_TEMPLATES[0]], orders=["BABA"], corruption="abc")
    assert all(p.startswith("When ") for p in one.clean)
    for clean, corrupted, io, s in zip(one.clean, one.corrupted, one.correct, one.incorrect):
        assert io.strip() not in corrupted and s.strip() not in corrupted
    small = ioi_task(8, seed=1).subset(3)
    assert len(small) == 3 and len(small.marks["S2"]) == 3 and small.corrupted == ioi_task(8, seed=1).corrupted[:3]
    with pytest.raises(ValueError, match="corruption"):
        ioi_task(2, corruption="swap")
    with pytest.raises(ValueError, match="orders"):
        ioi_task(2, orders=["AABB"])
    with pytest.raises(ValueError, match="at least 5 names"):
        ioi_task(2, names=["Ann", "Bob"])


def test_ioi_keeps_only_single_token_names(llama):
    # "w6 w7" is two tokens for the word tokenizer, so it never becomes a name
    tok = llama.tokenizer
    task = ioi_task(4, names=["w1", "w2", "w3", "w4", "w5", "w6 w7"], tokenizer=tok)
    assert all(name.strip() != "w6 w7" for name in task.correct + task.incorrect)


def test_encode_marks_and_metrics(llama):
    task = tiny_task(n=2, changed=2)
    enc = task.encode(llama)
    assert enc.clean_marks["X"].tolist() == [2, 2] and enc.clean_marks["end"].tolist() == [5, 5]
    assert enc.corrupted_marks["X"].tolist() == [2, 2]
    rows = torch.arange(2)
    logits = torch.zeros(2, 96)
    logits[rows, enc.correct] = 2.0
    logits[rows, enc.incorrect] = -1.0
    assert enc.score(logits).tolist() == [3.0, 3.0]
    prob = score(logits, enc.correct, None, "prob")
    torch.testing.assert_close(prob, logits.softmax(-1)[rows, enc.correct])
    torch.testing.assert_close(score(logits, enc.correct, None, "loss"), -prob.log())
    # rows may be k copies of each prompt, next to each other (row b * k + j is prompt b)
    assert enc.score(logits.repeat_interleave(3, dim=0)).tolist() == [3.0] * 6


def test_multi_token_answers(llama):
    task = Task(clean=["w4 w5"], correct=["w6 w7"], incorrect=["w8"])
    with pytest.raises(ValueError, match=r"correct answer 0 \('w6 w7'\) is 2 tokens.*multi_token='first'"):
        task.encode(llama)
    enc = Task(clean=["w4 w5"], correct=["w6 w7"], incorrect=["w8"], multi_token="first").encode(llama)
    assert enc.correct.tolist() == [llama.tokenizer.convert_tokens_to_ids("w6")]


@pytest.mark.parametrize("kwargs, match", [
    (dict(clean=[], correct=[]), "at least one clean prompt"),
    (dict(clean=["a"], correct=["b", "c"], incorrect=["d"]), "2 correct entries"),
    (dict(clean=["a"], correct=["b"]), "logit_diff metric needs an incorrect"),
    (dict(clean=["a"], correct=["b"], metric="accuracy"), "metric 'accuracy' is unknown"),
    (dict(clean="a", correct=["b"], metric="prob"), "list of strings"),
    (dict(clean=[""], correct=["b"], metric="prob"), "non-empty string"),
    (dict(clean=["a"], correct=["b"], metric="prob", marks={"IO": [1, 2]}), "give one per prompt"),
])
def test_task_rejects_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Task(**kwargs)


def test_load_facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [{"prompt": "The Eiffel Tower is in", "answer": " Paris", "incorrect": " Rome",
             "corrupted": "The Colosseum is in"},
            {"prompt": "The Colosseum is in", "answer": " Rome", "incorrect": " Paris",
             "corrupted": "The Eiffel Tower is in"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_facts(path)
    assert task.metric == "logit_diff" and task.correct == (" Paris", " Rome") and task.name == "facts"
    assert task.corrupted[0] == "The Colosseum is in"
    path.write_text(json.dumps({"prompt": "a", "answer": " b"}) + "\n")
    assert load_facts(path).metric == "prob" and load_facts(path).corrupted is None
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "a", "answer": " b"}) + "\n")
    with pytest.raises(ValueError, match="'incorrect' is on some lines but missing on others"):
        load_facts(path)
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"facts.jsonl:1 needs string fields"):
        load_facts(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"facts.jsonl:1 is not valid JSON"):
        load_facts(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_facts(tmp_path / "missing.jsonl")
