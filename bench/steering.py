"""Steering-vector extraction and steered generation, against steering-vectors.

    python bench/steering.py [--pairs 32] [--batch 8] [--layers 6,10,14,18] [--repeats 3]
                             [--peer-python /work/venv-tf4/bin/python]

Measured in this run, interleaved, medians:

1. Extraction throughput (pairs per second) of interplab's `extract_vector` (mean
   difference, last token) and of steering-vectors' `train_steering_vector` (mean
   aggregator, read_token_index=-1) on the same strings, batch size and layers, and the
   cosine similarity of the two vectors per layer (should be ~1).
2. Steered `generate` (one vector, one layer, KV cache) vs plain `generate`.

steering-vectors pins transformers<5, so when it is not importable here the peer runs in
another interpreter (`--peer-python`, a venv with steering-vectors, transformers<5 and the
same torch) as a worker process that this script drives over stdin/stdout; both sides load
the same converted checkpoint folder. The strings are CAA refusal items (shared data),
chat-formatted, ending with the answer letter, so the last token is the letter CAA reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
DEFAULT_PEER = "/work/venv-tf4/bin/python"


# --- the peer (steering-vectors), in this process or in a worker ---------------------------------

class PeerWorker:
    """steering-vectors in a worker process: one JSON request per line, one JSON answer per line."""

    def __init__(self, python: str, folder: str) -> None:
        self.proc = subprocess.Popen([python, __file__, "--worker", folder], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def train(self, pairs, layers, batch_size) -> dict:
        self.proc.stdin.write(json.dumps({"pairs": pairs, "layers": layers, "batch_size": batch_size}) + "\n")
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the steering-vectors worker exited; run it by hand to see its error")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def worker(folder: str) -> None:
    """Loop: read a request, train a steering vector with steering-vectors, answer with the
    seconds it took and the vector."""
    import steering_vectors
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:  # a 5.x config; 4.x reads only rope_theta
        config.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, torch_dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except ValueError:  # a folder saved by transformers 5 names a tokenizer class 4.x lacks
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids for a Llama
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                      "steering_vectors": getattr(steering_vectors, "__version__", "?")}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        vector = steering_vectors.train_steering_vector(
            model, tokenizer, [tuple(p) for p in request["pairs"]], layers=request["layers"],
            read_token_index=-1, batch_size=request["batch_size"])
        seconds = time.perf_counter() - start
        directions = {str(k): v.float().tolist() for k, v in vector.layer_activations.items()}
        print(json.dumps({"seconds": seconds, "directions": directions}), flush=True)


class InProcessPeer:
    def __init__(self, model) -> None:
        import steering_vectors
        import transformers

        self.model, self.sv = model, steering_vectors
        self.info = {"transformers": transformers.__version__, "in_process": True}

    def train(self, pairs, layers, batch_size) -> dict:
        start = time.perf_counter()
        vector = self.sv.train_steering_vector(self.model.hf, self.model.tokenizer, [tuple(p) for p in pairs],
                                               layers=layers, read_token_index=-1, batch_size=batch_size)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "directions": {str(k): v.float().tolist() for k, v in vector.layer_activations.items()}}

    def close(self) -> None:
        pass


# --- the benchmark ------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", default="6,10,14,18")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--peer-python", default=None, help=f"interpreter with steering-vectors (default {DEFAULT_PEER} when present)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    import torch
    import transformers

    import interplab
    from interplab.generation import format_prompt
    from interplab.steering.datasets import caa_path, pairs_from_texts, read_pairs
    from interplab.steering.extract import extract_vector

    model = interplab.load(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    items = read_pairs(caa_path("refusal", "generate"))[: args.pairs]
    pairs = [(format_prompt(model, p.prompt) + p.positive[:2], format_prompt(model, p.prompt) + p.negative[:2])
             for p in items]  # "...assistant\n(A" : the last token is the answer letter
    dataset = pairs_from_texts(pairs, source="CAA refusal (bench)")
    print(f"interplab: torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{len(pairs)} pairs, batch {args.batch}, layers {layers}, {torch.get_num_threads()} threads")

    peer = open_peer(model, args)
    print(f"steering-vectors side: {peer.info}")
    ours, theirs, result, answer = [], [], None, None
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = extract_vector(model, dataset, layers=layers, read="last", batch_size=args.batch, holdout=0.0)
        ours.append(time.perf_counter() - start)
        answer = peer.train(pairs, layers, args.batch)
        theirs.append(answer["seconds"])
    peer.close()
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    print(f"\nextraction (median of {args.repeats}, interleaved):")
    print(f"  interplab extract_vector       {len(pairs) / ours_s:7.2f} pairs/s  ({ours_s:.2f} s)")
    print(f"  steering-vectors train_...     {len(pairs) / theirs_s:7.2f} pairs/s  ({theirs_s:.2f} s)")
    print(f"  throughput ratio interplab / steering-vectors: {theirs_s / ours_s:.2f}x")
    cosines = {layer: cosine(result.vector[layer], torch.tensor(answer["directions"][str(layer)])) for layer in layers}
    print("  cosine(interplab, steering-vectors) per layer: " + ", ".join(f"{k}: {v:.6f}" for k, v in cosines.items()))
    print("  (interplab stops the forward after the deepest requested layer; steering-vectors runs the whole model)")
    bench_generate(model, result.vector, layers[len(layers) // 2], args)


def open_peer(model, args):
    try:
        import steering_vectors  # noqa: F401

        return InProcessPeer(model)
    except ImportError:
        python = args.peer_python or DEFAULT_PEER
        if not Path(python).exists():
            sys.exit(f"steering-vectors is not importable here and no peer interpreter at {python}; "
                     "pass --peer-python PATH (a venv with steering-vectors and transformers<5)")
        return PeerWorker(python, model.source)


def cosine(a, b) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def bench_generate(model, vector, layer: int, args) -> None:
    import interplab

    prompt = "The weather in California is"
    kwargs = dict(max_new_tokens=args.new_tokens, chat=False)
    times = {"plain": [], "steered": []}
    for run in range(args.repeats + 1):
        for name in times:
            start = time.perf_counter()
            if name == "plain":
                interplab.generate(model, prompt, **kwargs)
            else:
                with vector.apply(model, layers=[layer], scale=1.0):
                    interplab.generate(model, prompt, **kwargs)
            if run:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    plain, steered = statistics.median(times["plain"]), statistics.median(times["steered"])
    print(f"\ngenerate {args.new_tokens} tokens (KV cache), median of {args.repeats}:")
    print(f"  plain {plain * 1e3:.0f} ms, steered at layer {layer} {steered * 1e3:.0f} ms, ratio {steered / plain:.3f}")


if __name__ == "__main__":
    main()
