"""The workbench's attribution graph routes return interplab.graph's own graph, refuse bad input
with a 4xx and stay up. A tiny random llama with random transcoders keeps this fast."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from tests.decomp.test_graph import _transcoders  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

PROMPT = "the cat sat on the mat ."


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from interplab.sae.transcoder import save_transcoders
    from interplab.serve.app import create_app
    from interplab.serve.server import build_state

    folder = save_transcoders(_transcoders(), tmp_path_factory.mktemp("tc") / "tc")
    _index_layer_2(folder)
    state = build_state(tiny_model("llama"), transcoders={"tc": str(folder)}, datasets={},
                        max_graph_tokens=10, max_graph_features=40)
    with TestClient(create_app(state)) as test_client:
        yield test_client


def _windows():
    ids = torch.randint(4, 96, (16, 10), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 1
    return ids


def _index_layer_2(folder):
    """The layer-2 feature index where the server looks for it (layer 0 is left without one)."""
    from interplab.sae.features import build_feature_index, transcoder_index_path

    build_feature_index(tiny_model("llama"), _transcoders()[2], _windows(), transcoder_index_path(folder, 2),
                        n_top=4, n_bins=8).close()


def _library_graph(target=None, node_threshold=0.8, edge_threshold=0.98, cap=40):
    from interplab.graph.attribution import attribute
    from interplab.graph.prune import prune

    model = tiny_model("llama")
    ids = torch.tensor(model.tokenizer(PROMPT)["input_ids"])
    full = attribute(model, _transcoders(), ids, target=target, max_features_per_layer=cap)
    return prune(full, node_threshold=node_threshold, edge_threshold=edge_threshold).to_dict()


def _assert_same_graph(got: dict, want: dict) -> None:
    assert got["format_version"] == want["format_version"] == 1
    assert got["tokens"] == want["tokens"] and got["target"]["token_id"] == want["target"]["token_id"]
    assert [(n["kind"], n["layer"], n["position"], n["feature"]) for n in got["nodes"]] == \
           [(n["kind"], n["layer"], n["position"], n["feature"]) for n in want["nodes"]]
    torch.testing.assert_close(torch.tensor([n["value"] for n in got["nodes"]]),
                               torch.tensor([n["value"] for n in want["nodes"]]))
    assert [(e["source"], e["target"]) for e in got["edges"]] == [(e["source"], e["target"]) for e in want["edges"]]
    torch.testing.assert_close(torch.tensor([e["weight"] for e in got["edges"]]),
                               torch.tensor([e["weight"] for e in want["edges"]]))
    floats = {k for k, v in want["meta"].items() if isinstance(v, float)}
    assert {k: v for k, v in got["meta"].items() if k not in floats} == {k: v for k, v in want["meta"].items() if k not in floats}
    assert {k: got["meta"][k] for k in floats} == pytest.approx({k: want["meta"][k] for k in floats})


def test_graph_route_returns_the_library_graph(client):
    info = client.get("/api/info").json()
    assert info["transcoders"] == [{"name": "tc", "layers": [0, 2], "indexed_layers": [2], "d_sae": {"0": 64, "2": 64},
                                    "family": ["topk"], "skip": True, "model_id": None}]
    r = client.post("/api/graph", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    got = r.json()
    _assert_same_graph(got, _library_graph())
    assert got["meta"]["pruned"] and got["meta"]["features_total"] > got["meta"]["features_kept"] > 0
    r = client.post("/api/graph", json={"prompt": PROMPT, "transcoders": "tc", "target": "dog",
                                        "node_threshold": 0.5, "edge_threshold": 0.9, "max_features_per_layer": 8})
    assert r.status_code == 200, r.text
    _assert_same_graph(r.json(), _library_graph("dog", 0.5, 0.9, cap=8))
    assert r.json()["target"]["token"] == "dog" and r.json()["meta"]["features_total"] == 16  # 8 per layer


def test_feature_logit_effects_follow_the_unembedding(client):
    model = tiny_model("llama")
    transcoder = _transcoders()[2]
    r = client.get("/api/transcoders/tc/layers/2/features/5?n=4")
    assert r.status_code == 200, r.text
    card = r.json()
    gamma = model.hf.model.norm.weight.detach()
    effects = model.hf.lm_head.weight.detach() @ (gamma * transcoder.W_dec[5].detach() / transcoder.output_scale)
    top = effects.topk(4)
    assert [t for t, _ in card["promoted"]] == [model.tokenizer.decode([int(i)]) for i in top.indices]
    torch.testing.assert_close(torch.tensor([v for _, v in card["promoted"]]), top.values, rtol=1e-5, atol=1e-6)
    assert card["suppressed"][0][1] == pytest.approx(float(effects.min()), rel=1e-5)


def test_feature_card_has_the_top_contexts_of_the_layers_index(client, tmp_path):
    """With FOLDER/features-2.db, layer 2's cards carry the index's top contexts, each the transcoder's
    latents on the window's real MLP input; layer 0 has no index, so its cards say so (index null)."""
    from interplab.sae.features import build_feature_index

    reference = build_feature_index(tiny_model("llama"), _transcoders()[2], _windows(), tmp_path / "ref.db",
                                    n_top=4, n_bins=8)
    feature = next(f for f in range(64) if reference.summary(f).fire_count > 0)
    card = client.get(f"/api/transcoders/tc/layers/2/features/{feature}?contexts=3").json()
    want = reference.top_contexts(feature, 3)
    got = card["index"]["contexts"]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert (g["tokens"], g["max_pos"], g["acts"]) == (w.tokens, w.max_pos, w.acts)
        assert g["activation"] == pytest.approx(w.activation) and g["acts"][g["max_pos"]] == max(g["acts"])
    assert card["index"]["max_act"] == pytest.approx(reference.summary(feature).max_act)
    assert card["promoted"] and client.get("/api/transcoders/tc/layers/0/features/3").json()["index"] is None
    reference.close()


def test_an_index_of_other_transcoders_is_refused_at_start(tmp_path):
    import shutil

    from interplab.errors import UserInputError
    from interplab.sae.transcoder import save_transcoders
    from interplab.serve.server import build_state

    folder = save_transcoders(_transcoders(), tmp_path / "tc")
    _index_layer_2(folder)
    shutil.copy(folder / "features-2.db", folder / "features-0.db")  # layer 2's index where layer 0's belongs
    with pytest.raises(UserInputError, match="features-0.db was built from .*layer 2 there, 0 here"):
        build_state(tiny_model("llama"), transcoders={"tc": str(folder)}, datasets={})


@pytest.mark.parametrize("method, path, body, status, words", [
    ("post", "/api/graph", {"prompt": " ".join(["the"] * 11)}, 400, ["11 tokens", "--graph-max-tokens"]),
    ("post", "/api/graph", {"prompt": PROMPT, "target": "the cat"}, 400, ["single token"]),
    ("post", "/api/graph", {"prompt": PROMPT, "target": 500}, 400, ["outside the vocabulary"]),
    ("post", "/api/graph", {"prompt": PROMPT, "transcoders": "nope"}, 404, ["nope", "tc"]),
    ("post", "/api/graph", {"prompt": PROMPT, "max_features_per_layer": 41}, 400, ["--graph-max-features"]),
    ("post", "/api/graph", {"prompt": PROMPT, "node_threshold": 0}, 422, ["node_threshold"]),
    ("post", "/api/graph", {"prompt": ""}, 422, ["prompt"]),
    ("get", "/api/transcoders/tc/layers/1/features/0", None, 404, ["layer 1", "[0, 2]"]),
    ("get", "/api/transcoders/tc/layers/0/features/64", None, 400, ["64 latents"]),
    ("get", "/api/transcoders/other/layers/0/features/0", None, 404, ["other"]),
])
def test_bad_input_is_answered_and_the_server_stays_up(client, method, path, body, status, words):
    r = client.post(path, json=body) if method == "post" else client.get(path)
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.json()["error"]["message"], r.json()
    assert client.get("/api/transcoders").json()["data"][0]["name"] == "tc"


def test_unsupported_architecture_is_a_400(tmp_path):
    from fastapi.testclient import TestClient

    from interplab.sae.transcoder import Transcoder, TranscoderConfig, save_transcoders
    from interplab.serve.app import create_app
    from interplab.serve.server import build_state

    folder = save_transcoders({0: Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=8, layer=0, k=2))}, tmp_path / "tc")
    llama = tiny_model("llama")  # every family of the table is supported: pretend to be one that is not
    unknown = dataclasses.replace(llama, arch=dataclasses.replace(llama.arch, model_type="falcon"))
    state = build_state(unknown, transcoders={"tc": str(folder)}, datasets={})
    with TestClient(create_app(state)) as client:
        r = client.post("/api/graph", json={"prompt": "the cat sat"})
        assert r.status_code == 400 and "'falcon'" in r.json()["error"]["message"]


def test_transcoders_of_another_width_are_refused_at_start(tmp_path):
    from interplab.sae.transcoder import Transcoder, TranscoderConfig, save_transcoders
    from interplab.serve.server import build_state

    folder = save_transcoders({5: Transcoder(TranscoderConfig(d_in=32, d_out=32, d_sae=8, layer=5, k=2))}, tmp_path / "tc")
    with pytest.raises(ValueError, match="layer 5 .* 3 blocks of width 32"):
        build_state(tiny_model("llama"), transcoders={"tc": str(folder)}, datasets={})


def test_the_page_and_the_standalone_file_share_one_drawing_script(client):
    from interplab.graph.html import graph_html, graph_script

    served = client.get("/static/graph.js")
    assert served.status_code == 200 and "javascript" in served.headers["content-type"]
    assert served.text == graph_script() and "function renderGraph(" in served.text
    page = client.get("/").text
    assert page.index('src="/static/graph.js"') < page.index('src="/static/app.js"')
    data = {"format_version": 1, "tokens": ["a"], "target": {"token": "__DATA__"}, "meta": {}, "nodes": [], "edges": []}
    standalone = graph_html(data)
    assert graph_script() in standalone and standalone.count('"__DATA__"') == 1  # placeholders filled once


def test_transcoders_option_names_a_folder_after_itself():
    from interplab.errors import UserInputError
    from interplab.serve.server import transcoder_specs

    assert transcoder_specs(["runs/tc_smollm/", "b=other/tc"]) == {"tc_smollm": "runs/tc_smollm/", "b": "other/tc"}
    with pytest.raises(UserInputError, match="given twice"):
        transcoder_specs(["a/tc", "b/tc"])


def test_a_graph_build_does_not_block_the_server(monkeypatch, tmp_path):
    """The build runs in a worker thread: /api/info answers while a (slowed) graph is being built."""
    import threading
    import time

    import httpx

    import interplab.graph.attribution as attribution
    from interplab.sae.transcoder import save_transcoders
    from tests.serve.conftest import start

    real, started = attribution.attribute, threading.Event()

    def slow_attribute(*args, **kwargs):
        started.set()
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "attribute", slow_attribute)
    folder = save_transcoders(_transcoders(), tmp_path / "tc")
    running, _ = start(tiny_model("llama"), transcoders={"tc": str(folder)}, datasets={})
    try:
        answers = {}
        worker = threading.Thread(target=lambda: answers.setdefault(
            "graph", httpx.post(running.url + "/api/graph", json={"prompt": PROMPT}, timeout=30)))
        worker.start()
        assert started.wait(10)
        info = httpx.get(running.url + "/api/info", timeout=30)
        assert info.status_code == 200 and worker.is_alive()  # answered while the graph was still building
        worker.join(30)
        assert answers["graph"].status_code == 200 and answers["graph"].json()["format_version"] == 1
    finally:
        running.stop()
