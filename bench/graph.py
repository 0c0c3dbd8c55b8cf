"""Cost of an attribution graph on the default model (SmolLM2-135M), 16-token prompt.

    python bench/graph.py [--model smollm2-135m-instruct] [--layers all] [--d-sae 4608] [--k 32]
                          [--batch 64] [--sample 64] [--clock cpu] [--skip-full]

Transcoders are random-init of the trained shape (the cost does not depend on the weights).
Prints: time and peak memory (RSS) to build the replacement model and the whole graph with
batched backward passes (--batch targets per pass), and the ratio of the direct-effect
computation batched vs one backward pass per target, both timed on the same --sample targets
(target >= 5x).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT_16 = "The quick brown fox jumps over the lazy dog while the children watch from the"


def main() -> None:
    import torch

    import interplab
    from interplab.graph.attribution import _nodes, attribute, direct_effects
    from interplab.graph.replacement import ReplacementModel
    from interplab.sae.transcoder import Transcoder, TranscoderConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample", type=int, default=64)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--skip-full", action="store_true", help="Do not build the whole graph (only the ratio).")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    model = interplab.load(args.model)
    layers = range(model.n_layers) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    g = torch.Generator().manual_seed(0)
    transcoders = {L: Transcoder(TranscoderConfig(d_in=model.d_model, d_out=model.d_model, d_sae=args.d_sae,
                                                  layer=L, k=args.k), generator=g).eval() for L in layers}
    ids = model.tokenizer(PROMPT_16, return_tensors="pt")["input_ids"][0][:16]
    print(f"{model.model_id}: {len(ids)} tokens, transcoders on {len(transcoders)} layers (d_sae={args.d_sae}, k={args.k})")

    start = clock()
    replacement = ReplacementModel(model, transcoders, ids)
    print(f"replacement model: {clock() - start:.2f} s")
    token = int(replacement.real_logits[-1].argmax())
    nodes = _nodes(model, replacement, token)
    targets = [n for n in nodes if n["kind"] in ("feature", "logit")]
    sample = targets[-args.sample:]  # the deepest targets: the longest backward passes

    start = clock()
    for i in range(0, len(sample), args.batch):
        direct_effects(replacement, sample[i:i + args.batch], token)
    batched = clock() - start
    start = clock()
    for node in sample:
        direct_effects(replacement, [node], token)
    single = clock() - start
    print(f"direct effects of {len(sample)} targets: batched ({args.batch}/pass) {batched:.2f} s, "
          f"one per pass {single:.2f} s: {single / batched:.1f}x (target >= 5x)")

    if args.skip_full:
        return
    start = clock()
    graph = attribute(model, transcoders, ids, target=token, batch_size=args.batch)
    total = clock() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"whole graph: {len(graph.nodes)} nodes ({len(targets)} targets) in {total:.1f} s; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
