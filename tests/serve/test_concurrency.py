"""Many clients at once: batched == alone through the server, the bounded queue answers 429 at
once, and a client that disconnects mid-stream frees its row."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow  # gather windows and deliberately slowed generation: seconds of waiting

from tests.serve.conftest import start  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

PROMPTS = ["the cat sat on the mat", "a dog", "the weather is hot . the cat", "cold", "is a cat"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def served(llama, tmp_path_factory):
    from interplab.steering.vector import SteeringVector

    folder = tmp_path_factory.mktemp("vectors")
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        SteeringVector({j: torch.randn(llama.d_model, generator=g) for j in range(3)}).save(folder / f"v{i}")
    running, state = start(llama, vectors=str(folder), gather_s=0.3, max_queue=3, max_batch=8)
    yield running.url, state
    running.stop()


def completion(url, prompt, steering=None, max_tokens=10):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if steering:
        body["steering"] = steering
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


STEERINGS = [None, [{"vector": "v1", "layers": [0], "scale": 4.0}],
             [{"vector": "v2", "layers": [1, 2], "scale": -3.0, "positions": "generated"}],
             [{"vector": "v3", "scale": 5.0, "positions": {"from": -1}}]]


def test_concurrent_differently_steered_requests_batch_and_equal_alone(served):
    url, state = served
    alone = [completion(url, p, s).json()["choices"][0]["text"] for p, s in zip(PROMPTS, STEERINGS)]
    before = state.engine.batches_run
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda ps: completion(url, *ps), zip(PROMPTS[:3], STEERINGS[:3])))
    assert [r.status_code for r in replies] == [200] * 3
    assert [r.json()["choices"][0]["text"] for r in replies] == alone[:3]
    assert state.engine.batches_run - before < 3  # at least two of them shared a batch
    assert state.engine.largest_batch >= 2
    unsteered = [completion(url, p).json()["choices"][0]["text"] for p in PROMPTS[:3]]
    assert unsteered[0] == alone[0] and unsteered[1:] != alone[1:3]


def test_full_queue_answers_429_at_once_and_loses_nothing(served):
    url, state = served
    with ThreadPoolExecutor(6) as pool:
        state.engine.model_lock.acquire()  # hold the model: requests pile up
        try:
            futures = [pool.submit(completion, url, p) for p in PROMPTS + ["the mat"]]
            deadline = time.monotonic() + 20
            while sum(f.done() for f in futures) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            early = [f.result().status_code for f in futures if f.done()]
            held = state.engine.load
        finally:
            state.engine.model_lock.release()
    assert early == [429, 429, 429]
    assert held == 3
    statuses = sorted(f.result().status_code for f in futures)
    assert statuses == [200, 200, 200, 429, 429, 429]
    body = next(f.result() for f in futures if f.result().status_code == 429).json()
    assert body["error"]["code"] == "queue_full" and "--max-queue" in body["error"]["message"]


def test_disconnected_stream_frees_its_row(served, llama):
    url, state = served
    rows = []
    submit = state.engine.submit
    state.engine.submit = lambda row: rows.append(row) or submit(row)
    slow = llama.hf.register_forward_pre_hook(lambda *a: time.sleep(0.05))
    try:
        body = {"prompt": "the cat", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"text": ""' not in line:
                    break
        deadline = time.monotonic() + 10
        while state.engine.load and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.engine.load == 0
        assert rows[0].finish_reason == "cancelled" and len(rows[0].generated) < 40
        assert completion(url, "a dog").status_code == 200
    finally:
        slow.remove()
        state.engine.submit = submit
