"""Contrast-pair readers and their errors."""

import json

import pytest

from interplab.steering.datasets import (ContrastDataset, ContrastPair, actadd_pair, caa_path, pairs_from_texts,
                                         read_caa, read_pairs)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


CAA_ITEMS = [
    {"question": "Q1?\n\nChoices:\n(A) yes\n(B) no", "answer_matching_behavior": "(A)",
     "answer_not_matching_behavior": "(B)"},
    {"question": "Q2?\n\nChoices:\n(A) yes\n(B) no", "answer_matching_behavior": " (B)",
     "answer_not_matching_behavior": "(A)"},
]


def test_reads_caa_ab_format(tmp_path):
    data = read_pairs(write(tmp_path, "ab.json", json.dumps(CAA_ITEMS, indent=1)))
    assert data.kind == "ab" and len(data) == 2
    assert data[0] == ContrastPair("(A)", "(B)", CAA_ITEMS[0]["question"])
    assert data[1].ab_letters == ("B", "A")
    assert read_caa(tmp_path / "ab.json").pairs == data.pairs


def test_reads_jsonl_with_and_without_prompt(tmp_path):
    lines = [{"prompt": "Say", "positive": " yes", "negative": " no"}, {"prompt": "Tell", "positive": " a", "negative": " b"}]
    data = read_pairs(write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n"))
    assert data.kind == "prompt_completion" and data[1] == ContrastPair(" a", " b", "Tell")
    texts = read_pairs(write(tmp_path, "t.jsonl", json.dumps({"positive": "I love it", "negative": "I hate it"})))
    assert texts.kind == "texts" and texts[0].prompt == ""


def test_actadd_and_tuples():
    pair = actadd_pair("Love", "Hate")
    assert pair.kind == "actadd" and pair[0] == ContrastPair("Love", "Hate")
    data = pairs_from_texts([("hot", "cold")], prompt="It is")
    assert data.kind == "prompt_completion" and data[0].prompt == "It is"
    with pytest.raises(ValueError, match="ActAdd negative prompt is empty"):
        actadd_pair("Love", " ")


def test_malformed_json_names_line_and_column(tmp_path):
    text = '[\n {"question": "q", "answer_matching_behavior": "(A)",\n  "answer_not_matching_behavior" "(B)"}\n]'
    with pytest.raises(ValueError, match=r"bad\.json:3:\d+: invalid JSON"):
        read_pairs(write(tmp_path, "bad.json", text))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2:\d+: invalid JSON"):
        read_pairs(write(tmp_path, "bad.jsonl", '{"positive": "a", "negative": "b"}\n{"positive": "a",\n'))


def test_missing_key_names_line_and_key(tmp_path):
    items = CAA_ITEMS + [{"question": "Q3?", "answer_matching_behavior": "(A)"}]
    path = write(tmp_path, "ab.json", json.dumps(items, indent=1))
    line = path.read_text().splitlines().index(" {", 10) + 1  # where the third item starts
    with pytest.raises(ValueError, match=rf"ab\.json:{line}: missing key 'answer_not_matching_behavior'"):
        read_pairs(path)
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing key 'negative'"):
        read_pairs(write(tmp_path, "p.jsonl", '{"positive": "a", "negative": "b"}\n{"positive": "a"}\n'))
    with pytest.raises(ValueError, match=r"key 'positive' must be a string"):
        read_pairs(write(tmp_path, "q.jsonl", '{"positive": 3, "negative": "b"}\n'))


def test_answers_must_be_a_or_b(tmp_path):
    items = [dict(CAA_ITEMS[0], answer_matching_behavior="(C)")]
    path = write(tmp_path, "ab.json", json.dumps(items))
    with pytest.raises(ValueError, match=r"ab\.json:1: key 'answer_matching_behavior' is '\(C\)'; A/B answers must be"):
        read_pairs(path)
    same = [dict(CAA_ITEMS[0], answer_not_matching_behavior="(A)")]
    with pytest.raises(ValueError, match="both '\\(A\\)'"):
        read_pairs(write(tmp_path, "same.json", json.dumps(same)))
    mixed = items + CAA_ITEMS
    with pytest.warns(UserWarning, match="skipped 1 items"):
        assert len(read_pairs(write(tmp_path, "mixed.json", json.dumps(mixed)), skip_invalid=True)) == 2


def test_empty_datasets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        read_pairs(write(tmp_path, "e.json", "[]"))
    with pytest.raises(ValueError, match="empty"):
        read_pairs(write(tmp_path, "e.jsonl", "\n\n"))
    with pytest.raises(ValueError, match="empty"):
        ContrastDataset(())
    with pytest.raises(ValueError, match="no contrast-pair file"):
        read_pairs(tmp_path / "nope.json")


def test_mixed_forms_and_non_list(tmp_path):
    with pytest.raises(ValueError, match="some lines have a 'prompt'"):
        read_pairs(write(tmp_path, "m.jsonl", '{"positive": "a", "negative": "b"}\n{"prompt": "p", "positive": "a", "negative": "b"}\n'))
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_pairs(write(tmp_path, "o.json", '{"question": "q"}'))


def test_split_and_fingerprint():
    data = pairs_from_texts([(f"p{i}", f"n{i}") for i in range(10)])
    train, test = data.split(0.3, seed=1)
    assert len(train) == 7 and len(test) == 3
    assert not set(train.pairs) & set(test.pairs)
    assert data.fingerprint() == pairs_from_texts([(f"p{i}", f"n{i}") for i in range(10)]).fingerprint()
    assert data.fingerprint() != data[:9].fingerprint()


def test_shared_caa_refusal_data_reads(shared_dir):
    # caa_path raises when the file is missing, so the skip must look at the folder itself
    if not (shared_dir / "data" / "caa" / "generate" / "refusal").is_dir():
        pytest.skip(f"shared CAA data not present under {shared_dir / 'data' / 'caa'}")
    path = caa_path("refusal", "generate")
    assert path == shared_dir / "data" / "caa" / "generate" / "refusal" / "generate_dataset.json"
    data = read_pairs(path)
    assert len(data) == 408 and data.kind == "ab"
    assert len(read_pairs(caa_path("refusal", "test"))) == 50
    with pytest.raises(ValueError, match="no CAA test data for 'nonsense'"):
        caa_path("nonsense", "test")


def test_non_utf8_dataset_names_the_file(tmp_path):
    from interplab.errors import ArtifactError
    from interplab.steering.datasets import read_caa, read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_bytes('{"positive": "caf\u00e9", "negative": "th\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ArtifactError, match=r"pairs.jsonl is not UTF-8 text"):
        read_pairs(path)
    with pytest.raises(ArtifactError, match=r"pairs.jsonl is not UTF-8 text"):
        read_caa(path)


def test_missing_caa_data_is_reported_with_what_is_there(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_SHARED", str(tmp_path))
    (tmp_path / "data" / "caa" / "generate" / "sycophancy").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no CAA generate data for 'refusal'.*available: \['sycophancy'\]"):
        caa_path("refusal", "generate")
