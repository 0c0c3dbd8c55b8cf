"""Bad requests get OpenAI-shaped errors with the right status and the server stays up; auth;
bind checks; the bounded queue. A tiny random llama keeps these fast."""

from __future__ import annotations

import pytest
import torch

httpx = pytest.importorskip("httpx")

from tests.serve.conftest import start  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def base(llama, tmp_path_factory):
    from interplab.steering.vector import SteeringVector

    folder = tmp_path_factory.mktemp("vectors")
    SteeringVector({0: torch.ones(llama.d_model)}).save(folder / "ones")
    running, _ = start(llama, vectors=str(folder), max_tokens=8, max_prompt_tokens=40, max_body=4096)
    yield running.url
    running.stop()


def post(url, path, body, **kwargs):
    return httpx.post(url + path, json=body, timeout=30, **kwargs)


def chat_body(**extra):
    return {"messages": [{"role": "user", "content": "the cat sat"}], "max_tokens": 4, "temperature": 0, **extra}


def expect_error(response, status, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return error


CASES = [
    ("unknown vector", chat_body(steering=[{"vector": "nope"}]), 404, ["nope", "ones"]),
    ("unknown sae", chat_body(steering=[{"sae": "nope", "feature": 1, "mode": "add", "value": 1}]), 404, ["nope"]),
    ("wrong width", chat_body(steering=[{"vector": [0.5] * 7, "layers": [0]}]), 400, ["7", "32"]),
    ("bad layer", chat_body(steering=[{"vector": "ones", "layers": [9]}]), 400, ["layer 9", "3 blocks"]),
    ("bad json field", {"messages": "hello"}, 422, ["messages"]),
    ("bad temperature", chat_body(temperature=5), 422, ["temperature"]),
    ("bad positions", chat_body(steering=[{"vector": "ones", "positions": "middle"}]), 422, ["positions"]),
    ("too many tokens", chat_body(max_tokens=500), 400, ["500", "8"]),
    ("n > 1", chat_body(n=2), 400, ["n=2"]),
]


@pytest.mark.parametrize("name,body,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(base, name, body, status, words):
    expect_error(post(base, "/v1/chat/completions", body), status, *words)
    ok = post(base, "/v1/chat/completions", chat_body())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_malformed_json_is_422(base):
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    expect_error(r, 422)


def test_context_window_is_checked(llama, base):
    # the tiny llama has a 64-token window; a 36-token prompt leaves room for 28
    prompt = " ".join(["cat"] * 35)
    ok_len = len(llama.tokenizer(prompt)["input_ids"])
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    assert post(base, "/v1/completions", body).status_code == 200
    expect_error(post(base, "/v1/completions", {**body, "prompt": " ".join(["cat"] * 60)}), 400, "at most 40")
    assert ok_len <= 40


def test_context_window_exceeded_by_max_tokens(llama):
    running, _ = start(llama, max_tokens=100)
    try:
        body = {"prompt": " ".join(["cat"] * 50), "max_tokens": 30, "temperature": 0}
        error = expect_error(post(running.url, "/v1/completions", body), 400, "context window is 64")
        assert error["code"] == "context_length_exceeded"
    finally:
        running.stop()


def test_body_size_limit(base):
    big = chat_body(steering=[{"vector": [0.0] * 2000, "layers": [0]}])
    expect_error(post(base, "/v1/chat/completions", big), 413, "4096")


def test_auth(llama):
    running, _ = start(llama, api_key=KEY)
    try:
        url = running.url
        expect_error(post(url, "/v1/chat/completions", chat_body()), 401, "API key")
        expect_error(post(url, "/v1/chat/completions", chat_body(), headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url + "/api/vectors", timeout=10).status_code == 401
        good = {"Authorization": f"Bearer {KEY}"}
        assert post(url, "/v1/chat/completions", chat_body(), headers=good).status_code == 200
        assert httpx.get(url + "/v1/models", headers=good, timeout=10).status_code == 200
        assert httpx.get(url + "/", timeout=10).status_code == 200  # the page itself asks for the key
    finally:
        running.stop()


def test_no_cors_headers_unless_asked(llama, base):
    origin = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(base + "/v1/chat/completions", headers=origin, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    running, _ = start(llama, cors=["http://ok.example"], api_key=KEY)
    try:
        allowed = {**origin, "Origin": "http://ok.example", "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(running.url + "/v1/chat/completions", timeout=10, headers=allowed)
        assert r.status_code == 200  # the preflight carries no key, and needs none
        assert r.headers.get("access-control-allow-origin") == "http://ok.example"
        r = post(running.url, "/v1/chat/completions", chat_body(), headers={"Origin": "http://ok.example"})
        assert r.status_code == 401
    finally:
        running.stop()


def test_bind_check():
    from interplab.errors import UserInputError
    from interplab.serve.security import check_bind

    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", "key", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(UserInputError, match="--api-key"):
        check_bind("0.0.0.0", None, False)


def test_vector_registry_upload_list_delete(llama, base):
    ok = post(base, "/api/vectors", {"name": "up", "directions": {"1": [0.25] * llama.d_model}})
    assert ok.status_code == 201, ok.text
    names = [v["name"] for v in httpx.get(base + "/api/vectors", timeout=10).json()["data"]]
    assert "up" in names
    expect_error(post(base, "/api/vectors", {"name": "w", "directions": {"0": [1.0] * 5}}), 400, "5", "32")
    expect_error(post(base, "/api/vectors", {"name": "../evil", "directions": {"0": [1.0] * 32}}), 400,
                 "not allowed")
    steered = post(base, "/v1/chat/completions", chat_body(steering=[{"vector": "up", "scale": 2}]))
    assert steered.status_code == 200
    assert httpx.delete(base + "/api/vectors/up", timeout=10).status_code == 200
    expect_error(httpx.delete(base + "/api/vectors/up", timeout=10), 404, "up")


def test_gguf_upload(llama, base, tmp_path):
    from interplab.steering.vector import SteeringVector

    path = SteeringVector({1: torch.full((llama.d_model,), 0.5)}).to_gguf(tmp_path / "v.gguf")
    with open(path, "rb") as f:
        r = httpx.post(base + "/api/vectors/upload", data={"name": "fromgguf"}, timeout=30,
                       files={"files": ("v.gguf", f.read(), "application/octet-stream")})
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == [1]
