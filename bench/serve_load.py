"""Load test of `interplab serve` on loopback: N concurrent clients, each steering with its own vector.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--clients 8] [--max-tokens 48]
                               [--repeats 3] [--overload 24] [--max-queue 16] [--json out.json]

Runs a real server (uvicorn, in this process, on a free loopback port) and real HTTP clients
(httpx, one thread each). Measured, interleaved over `--repeats` rounds (medians):

- one at a time: the N requests (each with a different vector) sent one after the other;
- batched, steered: the same N requests sent at once (the server runs them as one batch);
- batched, unsteered: N requests without steering, sent at once.

Reported: requests/s, tokens/s, p50/p95 latency. Targets (issue #9): batched throughput >= 3x one
at a time; a steered batch within 1.10x the time of an unsteered batch. Then an overload round:
`--overload` requests at once against `--max-queue`; every request must get an answer, 200 or 429.
Bounded: every request has a timeout and the run stops after `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "Write a long story about a robot who learns to paint. Describe every day of its first week."


def start_server(model, vectors_dir: Path, max_queue: int, max_batch: int):
    import uvicorn

    from interplab.serve.app import create_app
    from interplab.serve.server import build_state

    state = build_state(model, vectors=str(vectors_dir), max_queue=max_queue, max_batch=max_batch,
                        max_tokens=512, gather_s=0.05)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, state, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def make_vectors(model, n: int, folder: Path, layer: int) -> None:
    """n random directions (fixed seeds), each scaled to a quarter of the residual norm at `layer`."""
    import torch

    from interplab.cache import capture
    from interplab.steering.vector import SteeringVector

    site = f"blocks.{layer}.hook_resid_post"
    norm = float(capture(model, [site], [PROMPT])[site][0, 1:].norm(dim=-1).mean())
    for i in range(n):
        direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(i))
        SteeringVector({layer: direction / direction.norm() * norm / 4}).save(folder / f"v{i}")


def request(url: str, steering, max_tokens: int) -> dict:
    import httpx

    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}
    if steering:
        body["steering"] = steering
    start = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    latency = time.perf_counter() - start
    tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
    return {"status": r.status_code, "latency": latency, "tokens": tokens}


def one_at_a_time(url, steerings, max_tokens):
    start, cpu = time.perf_counter(), time.process_time()
    results = [request(url, s, max_tokens) for s in steerings]
    return time.perf_counter() - start, time.process_time() - cpu, results


def all_at_once(url, steerings, max_tokens):
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(len(steerings)) as pool:
        results = list(pool.map(lambda s: request(url, s, max_tokens), steerings))
    return time.perf_counter() - start, time.process_time() - cpu, results


def summary(wall: float, cpu: float, results: list[dict]) -> dict:
    """cpu_s: CPU seconds of this process (server and clients): steadier than wall time when
    other programs load the machine."""
    latencies = sorted(r["latency"] for r in results)
    ok = [r for r in results if r["status"] == 200]
    return {"wall_s": wall, "cpu_s": cpu, "requests": len(results), "ok": len(ok),
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "tokens": sum(r["tokens"] for r in ok),
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overload", type=int, default=24)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import tempfile

    import torch

    import interplab

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = interplab.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        make_vectors(model, args.clients, Path(tmp), args.layer)
        server, thread, state, url = start_server(model, Path(tmp), args.max_queue, args.clients)
        try:
            steered = [[{"vector": f"v{i}", "scale": 1.0}] for i in range(args.clients)]
            plain = [None] * args.clients
            request(url, steered[0], 4)  # warm up
            rounds = {"one_at_a_time": [], "batched_steered": [], "batched_unsteered": []}
            for _ in range(args.repeats):  # interleaved, so load from other processes hits all three alike
                rounds["one_at_a_time"].append(summary(*one_at_a_time(url, steered, args.max_tokens)))
                rounds["batched_steered"].append(summary(*all_at_once(url, steered, args.max_tokens)))
                rounds["batched_unsteered"].append(summary(*all_at_once(url, plain, args.max_tokens)))
            _, _, results = all_at_once(url, [steered[i % args.clients] for i in range(args.overload)], args.max_tokens)
            overload = {"sent": args.overload, "max_queue": args.max_queue,
                        "answered": len(results), "status_200": sum(r["status"] == 200 for r in results),
                        "status_429": sum(r["status"] == 429 for r in results),
                        "other": sorted({r["status"] for r in results} - {200, 429})}
        finally:
            server.should_exit = True
            thread.join(30)
    report = {name: _median_round(rs) for name, rs in rounds.items()}
    report["throughput_ratio_batched_vs_one_at_a_time"] = (report["batched_steered"]["tok_per_s"]
                                                           / report["one_at_a_time"]["tok_per_s"])
    report["time_ratio_steered_vs_unsteered_batch"] = (report["batched_steered"]["wall_s"]
                                                       / report["batched_unsteered"]["wall_s"])
    report["cpu_ratio_steered_vs_unsteered_batch"] = (report["batched_steered"]["cpu_s"]
                                                      / report["batched_unsteered"]["cpu_s"])
    report["all_finished_by_length"] = all(r["tokens"] == args.max_tokens * args.clients
                                           for rs in rounds.values() for r in rs)
    report["overload"] = overload
    report["settings"] = {"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens,
                          "layer": args.layer, "repeats": args.repeats, "torch_threads": torch.get_num_threads()}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _median_round(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


if __name__ == "__main__":
    main()
